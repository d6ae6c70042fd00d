"""A trained stage at inference: load its export, generate, score the boxes, choose the decoding.

Shared by `litegpt evaluate` (a shard split) and `litegpt predict` (one file); neither reads training code.
A stage's text (prompts, parsing, labels) is its export's grammar (`TrainedStage.grammar`: the vocabulary
and task template of the shard set it trained on, recorded in export.json).

Box confidences: token i of a generation covers the characters that decoding its first i + 1 tokens adds
to decoding its first i (`token_offsets`), which follows the tokenizer's own decoder (leading-space
stripping, byte fallback) where re-encoding the text could tokenise it differently from what was
generated; `metrics.box_confidences` averages the probabilities of the tokens overlapping each box text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from litegpt.eval.metrics import box_confidences
from litegpt.grammar import TASKS, Grammar
from litegpt.labels import VocabularyError
from litegpt.model.config import ModelConfig, Visual, load_model_config
from litegpt.model.export import CONFIG, INFO, load_export


class EvalError(ValueError):
    """An input evaluate or predict cannot use; the message says what to do instead."""


# ---- decoding ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen. Sampling modes are seeded per batch (`seed_batch`), so runs repeat exactly."""

    mode: str = "greedy"  # greedy | sample | authors
    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.mode == "greedy":
            return {}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def seed_batch(self, chunk: int, task: str) -> None:
        """Seed torch (CPU and CUDA) for one batch, from the run's seed and the batch's place in the split."""
        torch.manual_seed((self.seed * 1_000_003 + chunk) * len(TASKS) + TASKS.index(task))


# The authors' evaluation code samples with temperature 0.6, top-p 0.9, at most 512 new tokens and
# transformers' default top-k of 50 (REFERENCE_FACTS.md); `sample` is plain temperature / top-p sampling.
PRESETS: dict[str, Decoding] = {
    "greedy": Decoding("greedy", 256),
    "sample": Decoding("sample", 256, temperature=1.0, top_p=1.0, top_k=0),
    "authors": Decoding("authors", 512, temperature=0.6, top_p=0.9, top_k=50),
}


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoding", choices=tuple(PRESETS), default="greedy",
                        help="greedy (default); sample: seeded temperature/top-p sampling; authors: the authors' "
                             "settings (sampling, temperature 0.6, top-p 0.9, top-k 50, 512 new tokens), seeded")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 256, authors 512")
    parser.add_argument("--temperature", type=float, default=None, help="sample/authors (default 1.0 / 0.6)")
    parser.add_argument("--top-p", type=float, default=None, help="sample/authors (default 1.0 / 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling modes (default 0)")


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    preset = PRESETS[args.decoding]
    if preset.mode == "greedy" and (args.temperature is not None or args.top_p is not None):
        raise EvalError("--temperature and --top-p apply to --decoding sample or authors, not greedy")
    chosen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    decoding = dataclasses.replace(preset, seed=args.seed, **{k: v for k, v in chosen.items() if v is not None})
    if decoding.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {decoding.max_new_tokens}")
    return decoding


# ---- the trained stage and its model ----------------------------------------------------------------

@dataclass(frozen=True)
class TrainedStage:
    """A trained stage directory (`runs/<run>/<stage>`) and what its export says."""

    directory: Path
    info: dict  # export.json
    model_cfg: ModelConfig
    task_token: str | None  # the stage's `[identify]` override (the `[grounding]` ablation), if any
    grammar: Grammar  # the text it trained on: `Grammar.from_record(info)`, the vocabulary of its shard set

    @property
    def export(self) -> Path:
        return self.directory / "export"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.info.get("tasks") or TASKS)

    def prompt(self, task: str) -> str:
        """The prompt the stage trained with (the task token override applies to `identify` only)."""
        return self.grammar.prompt(task, self.task_token if task == "identify" else None)


def _no_export(directory: Path) -> EvalError:
    """What to pass instead of a directory without an export: one of a run's stages, or train it first."""
    if not directory.is_dir():
        return EvalError(f"--run {directory}: no such directory (expected runs/<run>/<stage>)")
    stages = sorted(p.parent.parent.name for p in directory.glob(f"*/export/{INFO}"))
    if stages:
        return EvalError(f"--run {directory} is a run, not a stage; pass one of its stages with an export: "
                         + ", ".join(f"--run {directory / s}" for s in stages))
    return EvalError(f"--run {directory}: no export ({directory / 'export' / INFO} is missing); a stage writes it "
                     "when its training finishes: train it first, e.g. `deepspeed train.py --deepspeed "
                     "ds_configs/zero2.json --config configs/stage1.yaml` (stage 2: configs/stage2.yaml)")


def load_stage(directory: Path) -> TrainedStage:
    """Read a stage's export; a run directory or a stage without an export gets a message saying what to pass."""
    directory = Path(directory)
    export = directory / "export"
    if not (export / INFO).is_file():
        raise _no_export(directory)
    info = json.loads((export / INFO).read_text())
    token = info.get("task_token")
    snapshot = directory / "config.yaml"
    if token is None and snapshot.is_file():  # exports that predate `task_token` in export.json
        import yaml

        token = (yaml.safe_load(snapshot.read_text()).get("stage") or {}).get("task_token")
    try:
        grammar = Grammar.from_record(info)  # exports made before vocabularies were recorded: VinDr-CXR's
    except VocabularyError as exc:
        raise EvalError(f"{export / INFO}: {exc}") from None
    return TrainedStage(directory, info, load_model_config(export / CONFIG), token, grammar)


def inference_device() -> torch.device:
    from litegpt import distributed

    return torch.device("cuda", distributed.detect().local_rank) if torch.cuda.is_available() else torch.device("cpu")


def load_model(stage: TrainedStage, with_encoders: bool, device: torch.device):
    """The base model with the stage's export applied, in eval mode on `device`.

    The MiniGPT-v2 checkpoint is not read: the export replaces every weight it would initialise.
    """
    from litegpt.model.model import build_model

    model = build_model(dataclasses.replace(stage.model_cfg, minigpt_checkpoint=None), with_encoders=with_encoders)
    load_export(model, stage.export)
    return model.to(device).eval()


# ---- generation and box scores ----------------------------------------------------------------------

def generate(model, stage: TrainedStage, task: str, keys: Sequence[str], visual: Sequence[dict[str, torch.Tensor]],
             source: Visual, decoding: Decoding, chunk: int) -> list:
    """One batch of one task: the generations (`model.Generation`) for `keys`, in order."""
    batch = model.inputs.generation_batch(keys, [stage.prompt(task)] * len(keys), visual, source)
    decoding.seed_batch(chunk, task)
    device = next(model.llm.parameters()).device
    return model.generate(batch.to(device), decoding.max_new_tokens, **decoding.generate_kwargs())


def token_offsets(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span of each generated token in `text` (= its decoding; see the module doc).

    A prefix ending inside a multi-byte character (byte-fallback pieces) decodes with U+FFFD in place of
    that character; the prefix's end is where its decoding stops agreeing with `text`, so the character
    goes to the token that completes it and the tokens before get empty spans.
    """
    prefixes = tokenizer.batch_decode([list(ids[: i + 1]) for i in range(len(ids))], skip_special_tokens=True)
    offsets, start = [], 0
    for prefix in prefixes:
        agreed = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
        end = max(agreed, start)
        offsets.append((start, end))
        start = end
    return offsets


def box_scores(tokenizer, generation, grammar: Grammar) -> list[float]:
    """One confidence per box `grammar.parse` finds in the generation, in parse order."""
    spans = grammar.parse(generation.text).box_spans
    if not spans:
        return []
    return box_confidences(spans, generation.probs, token_offsets(tokenizer, generation.token_ids, generation.text))
