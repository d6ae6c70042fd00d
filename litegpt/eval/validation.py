"""Validation during training: from the model being trained, the teacher-forced loss on the whole validation
split and greedy generations on its first images, scored by `litegpt evaluate`'s metric code.

train.py builds a `Validator` from the recipe (a `ValidationPlan`: this layer does not read training code)
and the trainer calls it every `eval.every` optimizer steps and at the end of the stage, on every rank in
step. Its figures are named as `litegpt evaluate` names them (`report.scalars`), so the `val/` curves of a
run and the `eval/` figures of an evaluation of its export compare directly. Its text (prompts, targets,
parsing, labels) is the shard set's grammar, the one the stage trains on and its export records.

The same figures on any world size, and after a resume:
- the validation samples (image x task, images in shard order) are cut into chunks of `batch`; rank r
  computes chunks r, r + W, ... A chunk's loss sum and answer-token count go to its own row of a zeroed
  float64 table that one all-reduce fills (each row comes from one rank, the others add zeros: exact), and
  every rank adds the rows in chunk order. The loss is the sum of the per-token losses over the answer
  tokens of the split (the chunks' `mean loss x tokens`), over its answer tokens.
- the first `generate` images are cut into chunks of `batch` images, dealt the same way; a chunk is one
  greedy generation batch per task. Rank 0 gathers the predictions in chunk order, scores them
  (`metrics.compute_metrics`) and sends the figures to every rank.
- the model runs in eval mode with rank 0's buffers (merge.norm's running statistics: every rank updates its
  own while training, and rank 0's are the ones exported and checkpointed) under a forked RNG (LoRA dropout
  and the sampling seeds draw from the global one); afterwards every module's mode, every buffer and the
  RNG are as they were, so training goes on exactly as it would have without validation.

The validation images are listed (from the shards' json) when the validator is built; each rank reads the
samples of its chunks once, at the first validation (the feature cache exists by then), and keeps them
undecoded in memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from litegpt.data.integrity import verify_shard_set
from litegpt.data.shards import MANIFEST, iter_tar, read_manifest, read_samples
from litegpt.data.splits import Holdout
from litegpt.eval.inference import PRESETS, TrainedStage, box_scores, generate
from litegpt.eval.metrics import Prediction, compute_metrics
from litegpt.eval.report import scalars
from litegpt.features import open_cache, visual_decoder
from litegpt.grammar import Grammar
from litegpt.labels import VocabularyError
from litegpt.model.config import ConfigError, ModelConfig, Visual
from litegpt.model.inputs import IGNORE_INDEX, TrainSample

# The generation figures reported (names of `report.scalars`); the recipe's `eval.best` chooses among these
# and the loss.
SCORED = ("parse/all_rate", "strict/local/micro_avg_f1", "reference/local/micro_avg_f1", "strict/box_f1@0.5",
          "strict/global/micro_avg_f1", "reference/global/micro_avg_f1")
GREEDY = PRESETS["greedy"]


@dataclass(frozen=True)
class ValidationPlan:
    """What a stage validates on, and how much, as its recipe says."""

    shards: Path  # the image shard set
    visual: Visual  # what the stage reads: the shards' feature cache, or the images through live encoders
    model_path: str  # the model config file (named in the feature cache's rebuild hint)
    holdout: Holdout  # the validation images
    tasks: tuple[str, ...]
    task_token: str | None
    findings_only: bool  # validate on the images with findings only, as the stage trains
    batch: int  # samples per loss chunk, images per generation chunk
    generate: int  # images generated from and scored (at most; 0: the loss only)
    stage_dir: Path


class Validator:
    """One stage's validation on one rank; `validator(model, step)` gives the figures, the same on every rank."""

    def __init__(self, plan: ValidationPlan, model_cfg: ModelConfig, rank: int, world_size: int):
        """Lists the validation images; a ConfigError when there are none."""
        self.plan, self.model_cfg, self.rank, self.world_size = plan, model_cfg, rank, world_size
        try:
            grammar = Grammar.from_record(read_manifest(plan.shards))
        except VocabularyError as exc:
            raise ConfigError(f"{plan.shards / MANIFEST}: {exc}") from None
        info = {"tasks": list(plan.tasks), "task_token": plan.task_token, **grammar.to_dict()}
        self.stage = TrainedStage(plan.stage_dir, info, model_cfg, plan.task_token, grammar)
        self.images = validation_images(plan.shards, plan.holdout, plan.findings_only)
        if not self.images:
            held = (f"split {plan.holdout.split!r}" if plan.holdout.fraction is None else
                    f"the share {plan.holdout.fraction} (eval.fraction) of split {plan.holdout.split!r}")
            raise ConfigError(f"{plan.shards}: {held} holds no validation image"
                              f"{' with findings (stage.findings_only)' if plan.findings_only else ''}")
        samples = [(index, task) for index in range(len(self.images)) for task in plan.tasks]
        self.loss_chunks = _chunks(samples, plan.batch)
        self.generation_chunks = _chunks(list(range(min(plan.generate, len(self.images)))), plan.batch)
        self._raw: dict[int, dict] | None = None  # image index -> undecoded sample, this rank's, once read

    @property
    def samples(self) -> int:
        """Validation samples (image x task) the loss covers."""
        return sum(map(len, self.loss_chunks))

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """The loss and, when `generate` > 0, the generation figures of `model` (the LiteGPT module being
        trained; the same weights on every rank). `step` is not used in the figures: it names them in logs."""
        if self._raw is None:
            self._raw = self._read_mine()
        device = next(model.parameters()).device
        decode = visual_decoder(self.plan.visual, model.vision.preprocess if model.vision is not None else None)
        with _as_rank0_in_eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            figures = {"loss": self._loss(model, decode, device)}
            if self.generation_chunks:
                figures.update(self._scores(model, decode))
        return figures

    # ---- the loss --------------------------------------------------------------------------------------

    @torch.no_grad()
    def _loss(self, model, decode, device: torch.device) -> float:
        table = torch.zeros((len(self.loss_chunks), 2), dtype=torch.float64, device=device)
        for c in self._mine(self.loss_chunks):
            samples = [TrainSample(f"{self.images[i]['image_id']}/{task}", self.stage.prompt(task),
                                   self.stage.grammar.answer(task, self.images[i]), decode(self._raw[i]),
                                   self.plan.visual)
                       for i, task in self.loss_chunks[c]]
            batch = model.inputs.train_batch(samples).to(device)
            tokens = (batch.labels[:, 1:] != IGNORE_INDEX).sum()  # what the causal-LM loss averages over
            table[c] = torch.stack([model(batch).loss.double() * tokens, tokens.double()])
        if self.world_size > 1:
            dist.all_reduce(table)
        loss_sum, tokens = 0.0, 0.0
        for row_loss, row_tokens in table.tolist():  # chunk order, on every rank
            loss_sum, tokens = loss_sum + row_loss, tokens + row_tokens
        return loss_sum / tokens

    # ---- generation ------------------------------------------------------------------------------------

    def _scores(self, model, decode) -> dict[str, float]:
        mine = {c: self._predict(model, decode, c) for c in self._mine(self.generation_chunks)}
        parts: list = [mine]
        if self.world_size > 1:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, mine)
        figures = [None]
        if self.rank == 0:
            by_chunk = {c: p for part in parts for c, p in part.items()}
            values = scalars(compute_metrics([p for c in range(len(self.generation_chunks)) for p in by_chunk[c]],
                                              self.stage.grammar, text=False))
            figures = [{name: values[name] for name in SCORED if name in values}]
        if self.world_size > 1:
            dist.broadcast_object_list(figures, src=0)
        return figures[0]

    def _predict(self, model, decode, chunk: int) -> list[Prediction]:
        """One generation chunk: greedy generations for its images, task by task, as evaluate records them."""
        metas = [self.images[i] for i in self.generation_chunks[chunk]]
        visual = [decode(self._raw[i]) for i in self.generation_chunks[chunk]]
        out = []
        for task in self.plan.tasks:
            generations = generate(model, self.stage, task, [m["image_id"] for m in metas], visual, self.plan.visual,
                                   GREEDY, chunk)
            grammar = self.stage.grammar
            out += [Prediction(meta["image_id"], task, gen.text, grammar.answer(task, meta), meta["findings"],
                               meta["diagnoses"], gen.probs, box_scores(model.tokenizer, gen, grammar))
                    for meta, gen in zip(metas, generations)]
        return out

    # ---- this rank's samples ---------------------------------------------------------------------------

    def _mine(self, chunks: Sequence) -> range:
        return range(self.rank, len(chunks), self.world_size)

    def _read_mine(self) -> dict[int, dict]:
        """The undecoded samples of this rank's chunks, from the shards or their feature cache."""
        wanted = {i for c in self._mine(self.loss_chunks) for i, _ in self.loss_chunks[c]}
        wanted |= {i for c in self._mine(self.generation_chunks) for i in self.generation_chunks[c]}
        plan = self.plan
        source = plan.shards
        if plan.visual is Visual.CACHE:
            source = open_cache(plan.shards, self.model_cfg.vision, plan.model_path).directory
        by_key = {self.images[i]["__key__"]: i for i in wanted}
        shards = dict.fromkeys(self.images[i]["__shard__"] for i in sorted(wanted))
        raw = {by_key[s["__key__"]]: s for s in read_samples(source / name for name in shards)
               if s["__key__"] in by_key}
        missing = sorted(set(by_key) - {self.images[i]["__key__"] for i in raw})
        if missing:
            raise ConfigError(f"{source}: validation sample(s) {missing[:5]} not found in their shards")
        return raw


def validation_images(shards: Path, holdout: Holdout, findings_only: bool) -> list[dict]:
    """The json of every validation image, in shard order, with its shard's name (`__shard__`) and its sample
    key (`__key__`) added; only those with findings when `findings_only`. The split's shards are verified first."""
    manifest = verify_shard_set(shards, holdout.split)
    out = []
    for shard in (s for s in manifest["shards"] if s["split"] == holdout.split):
        for sample in iter_tar(Path(shards) / shard["name"], extensions={"json"}):
            meta = json.loads(sample.members["json"])
            if holdout.holds(meta["image_id"]) and (not findings_only or meta["findings"]):
                out.append({**meta, "__shard__": shard["name"], "__key__": sample.key})
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


@contextlib.contextmanager
def _as_rank0_in_eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode with rank 0's buffers; every module's mode and every buffer restored after."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        if dist.is_initialized() and dist.get_world_size() > 1:
            for b in buffers:
                dist.broadcast(b, src=0)
        model.eval()
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        for module, training in modes:
            module.training = training
