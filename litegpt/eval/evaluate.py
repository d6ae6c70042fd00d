"""`litegpt evaluate`: a trained stage's export on a shard split -> predictions, the paper's metrics, a report.

    litegpt evaluate --run runs/<run>/<stage> --shards shards/<name> [--split test] [--limit N] ...
    torchrun --nproc-per-node 8 -m -- litegpt.cli evaluate --run ...
    deepspeed --num_gpus 8 --no_local_rank --module litegpt.cli evaluate --run ...
    srun python -m litegpt.cli evaluate --run ...

(torchrun needs the `--`: its parser would take `--run` for an abbreviation of its own `--run-path`;
deepspeed needs `--no_local_rank`: the rank arrives in LOCAL_RANK, not as an argument.)

Visual input: the shards' feature cache for the export's encoders when there is one (`--features auto`),
else the encoders run live on the PNGs; both paths round features alike (see `litegpt.model.model`).

Work split: the split's first `--limit` samples are cut, in shard order, into chunks of `--batch-size`;
rank r takes chunks r, r + W, ...; a chunk is one generation batch per task, seeded by (seed, chunk, task).
So every batch, and hence every prediction (sampled ones included), is the same whatever the number of
ranks. Each rank writes `parts/rank-NNNNN.jsonl`; after a barrier (gloo: it is the only collective, so
no GPU communicator is needed) rank 0 merges the parts in chunk order and writes `predictions.jsonl`,
`metrics.json`, `report.md`, `overlays/` and `settings.json`, and logs to the stage's `tensorboard/`.

Box confidences: token i of a generation covers the characters that decoding its first i + 1 tokens adds
to decoding its first i (`token_offsets`), which follows the tokenizer's own decoder (leading-space
stripping, byte fallback) where re-encoding the text could tokenise it differently from what was
generated; `metrics.box_confidences` averages the probabilities of the tokens overlapping each box text.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image

from litegpt import __version__
from litegpt.eval.metrics import Prediction, box_confidences, compute_metrics, read_predictions, write_predictions
from litegpt.eval.report import OVERLAYS, scalars
from litegpt.features import visual_decoder
from litegpt.grammar import TASKS, parse, render_answer, render_prompt
from litegpt.model.config import ConfigError, ModelConfig, load_model_config
from litegpt.model.export import CONFIG, INFO, load_export
from litegpt.model.inputs import Visual

TENSORBOARD_OVERLAYS = 4
# A rank that finishes early waits at the barrier for the slowest; launchers end the whole job if a rank dies.
BARRIER_TIMEOUT = timedelta(hours=12)


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


# ---- the stage and its model ------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """A trained stage directory (`runs/<run>/<stage>`) and what its export says."""

    directory: Path
    info: dict  # export.json
    model_cfg: ModelConfig
    task_token: str | None  # the stage's `[identify]` override (the `[grounding]` ablation), if any

    @property
    def export(self) -> Path:
        return self.directory / "export"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.info.get("tasks") or TASKS)

    def prompt(self, task: str) -> str:
        """The prompt the stage trained with (the task token override applies to `identify` only)."""
        return render_prompt(task, self.task_token if task == "identify" else None)


def load_stage(directory: Path) -> Stage:
    """Read a stage's export; a run directory or a stage without an export gets a message saying what to pass."""
    directory = Path(directory)
    export = directory / "export"
    if not (export / INFO).is_file():
        if not directory.is_dir():
            raise EvalError(f"--run {directory}: no such directory (expected runs/<run>/<stage>)")
        stages = sorted(p.parent.parent.name for p in directory.glob(f"*/export/{INFO}"))
        if stages:
            raise EvalError(f"--run {directory} is a run, not a stage; pass one of its stages with an export: "
                            + ", ".join(f"--run {directory / s}" for s in stages))
        raise EvalError(f"--run {directory}: no export ({export / INFO} is missing); a stage writes it when its "
                        "training finishes: train it first, e.g. `deepspeed train.py --deepspeed "
                        "ds_configs/zero2.json --config configs/stage1.yaml` (stage 2: configs/stage2.yaml)")
    info = json.loads((export / INFO).read_text())
    token = info.get("task_token")
    snapshot = directory / "config.yaml"
    if token is None and snapshot.is_file():  # exports that predate `task_token` in export.json
        import yaml

        token = (yaml.safe_load(snapshot.read_text()).get("stage") or {}).get("task_token")
    return Stage(directory, info, load_model_config(export / CONFIG), token)


def inference_device() -> torch.device:
    from litegpt import distributed

    return torch.device("cuda", distributed.detect().local_rank) if torch.cuda.is_available() else torch.device("cpu")


def load_model(stage: Stage, with_encoders: bool, device: torch.device):
    """The base model with the stage's export applied, in eval mode on `device`.

    The MiniGPT-v2 checkpoint is not read: the export replaces every weight it would initialise.
    """
    from litegpt.model.model import build_model

    model = build_model(dataclasses.replace(stage.model_cfg, minigpt_checkpoint=None), with_encoders=with_encoders)
    load_export(model, stage.export)
    return model.to(device).eval()


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


def box_scores(tokenizer, generation) -> list[float]:
    """One confidence per box `grammar.parse` finds in the generation, in parse order."""
    spans = parse(generation.text).box_spans
    if not spans:
        return []
    return box_confidences(spans, generation.probs, token_offsets(tokenizer, generation.token_ids, generation.text))


def generate(model, stage: Stage, task: str, keys: Sequence[str], visual: Sequence[dict[str, torch.Tensor]],
             source: Visual, decoding: Decoding, chunk: int) -> list:
    """One batch of one task: the generations (`model.Generation`) for `keys`, in order."""
    batch = model.inputs.generation_batch(keys, [stage.prompt(task)] * len(keys), visual, source)
    decoding.seed_batch(chunk, task)
    device = next(model.llm.parameters()).device
    return model.generate(batch.to(device), decoding.max_new_tokens, **decoding.generate_kwargs())


# ---- reading the split ------------------------------------------------------------------------------

def raw_samples(urls: Sequence[Path]) -> Iterator[dict]:
    """Undecoded samples ({"__key__", "json": bytes, "png" or "<encoder>.npy": bytes}) in shard order."""
    import webdataset as wds

    return iter(wds.DataPipeline(wds.SimpleShardList([str(u) for u in urls]), wds.tarfile_to_samples()))


class ShardImages:
    """image_id -> its shard PNG, for the report's overlays. They are requested in prediction order, which is
    shard order, so one forward pass over the shards serves them all; an earlier id restarts the pass."""

    def __init__(self, urls: Sequence[Path]):
        self.urls = urls
        self._samples: Iterator[dict] = iter(())

    def __call__(self, image_id: str) -> Image.Image:
        for _ in range(2):
            for raw in self._samples:
                if raw["__key__"] == image_id:
                    return Image.open(io.BytesIO(raw["png"]))
            self._samples = raw_samples(self.urls)
        raise KeyError(f"image {image_id!r} is not in the image shards")


@dataclass(frozen=True)
class Source:
    urls: list[Path]  # shards streamed for generation: feature shards or image shards
    image_urls: list[Path]  # image shards (overlays)
    samples: int  # samples of the split
    visual: Visual
    description: str


def open_source(shards: Path, split: str, stage: Stage, features: Visual | None) -> tuple[Source, str | None]:
    """The split's shards to stream, and a note when `auto` (None) falls back to live encoders."""
    from litegpt.data.shards import read_manifest, shard_paths
    from litegpt.features import FeatureCacheError, open_cache

    manifest = read_manifest(shards)
    splits = sorted({s["split"] for s in manifest["shards"]})
    if split not in splits:
        raise EvalError(f"{shards} has no {split!r} split (its splits: {', '.join(splits) or 'none'})")
    image_urls = shard_paths(shards, split, manifest)
    count = sum(s["samples"] for s in manifest["shards"] if s["split"] == split)
    if features is not Visual.LIVE:
        try:
            cache = open_cache(shards, stage.model_cfg.vision, stage.export / CONFIG)
            return Source(cache.shard_paths(split), image_urls, count, Visual.CACHE,
                          f"feature cache {cache.directory}"), None
        except FeatureCacheError as exc:
            if features is Visual.CACHE:
                raise
            note = f"no usable feature cache, running the encoders on the PNGs ({exc})"
    else:
        note = None
    return Source(image_urls, image_urls, count, Visual.LIVE, f"live encoders on {shards}"), note


# ---- evaluation -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalOptions:
    run: Path
    shards: Path
    split: str = "test"
    limit: int | None = None
    batch_size: int = 8
    tasks: tuple[str, ...] | None = None  # None: the stage's tasks
    decoding: Decoding = PRESETS["greedy"]
    features: Visual | None = None  # None: the feature cache if there is one, else live encoders
    out: Path | None = None  # None: <run>/eval
    overlays: int = OVERLAYS


def chunk_sizes(samples: int, batch_size: int) -> list[int]:
    return [min(batch_size, samples - start) for start in range(0, samples, batch_size)]


def merge_parts(parts: Sequence[Sequence[Prediction]], sizes: Sequence[int], tasks: int) -> list[Prediction]:
    """Rank outputs back in chunk order: chunk c (sizes[c] samples x tasks records) came from rank c % W."""
    world = len(parts)
    expected = [sum(n * tasks for c, n in enumerate(sizes) if c % world == r) for r in range(world)]
    if [len(p) for p in parts] != expected:
        raise RuntimeError(f"rank outputs hold {[len(p) for p in parts]} records, expected {expected}")
    cursors = [iter(p) for p in parts]
    return [next(cursors[c % world]) for c, n in enumerate(sizes) for _ in range(n * tasks)]


def _chunks(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    return iter(lambda: list(itertools.islice(samples, size)), [])


def predict_part(model, stage: Stage, source: Source, opts: EvalOptions, tasks: Sequence[str], rank: int,
                 world: int, samples: int) -> list[Prediction]:
    """This rank's predictions: its chunks, in order, each chunk task by task."""
    from tqdm import tqdm

    decode = visual_decoder(source.visual, model.vision.preprocess if model.vision is not None else None)
    sizes = chunk_sizes(samples, opts.batch_size)
    bar = tqdm(total=sum(n for c, n in enumerate(sizes) if c % world == rank), unit="img", desc="evaluate",
               dynamic_ncols=True, disable=rank != 0)
    out: list[Prediction] = []
    seen = 0
    for chunk, raws in enumerate(_chunks(itertools.islice(raw_samples(source.urls), samples), opts.batch_size)):
        seen += len(raws)
        if chunk % world != rank:
            continue
        metas = [json.loads(raw["json"]) for raw in raws]
        visual = [decode(raw) for raw in raws]
        keys = [m["image_id"] for m in metas]
        for task in tasks:
            for meta, gen in zip(metas, generate(model, stage, task, keys, visual, source.visual, opts.decoding,
                                                 chunk)):
                out.append(Prediction(meta["image_id"], task, gen.text, render_answer(task, meta), meta["findings"],
                                      meta["diagnoses"], gen.probs, box_scores(model.tokenizer, gen)))
        bar.update(len(raws))
    bar.close()
    if seen != samples:
        raise EvalError(f"{source.description}: {seen} samples read, the manifest promises {samples}")
    return out


def evaluate(opts: EvalOptions) -> tuple[Path, dict] | None:
    """Run the evaluation on this rank; rank 0 returns (eval directory, metrics), other ranks None."""
    from litegpt import distributed

    stage = load_stage(opts.run)
    tasks = tuple(dict.fromkeys(opts.tasks or stage.tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    if opts.batch_size < 1 or (opts.limit is not None and opts.limit < 1):
        raise EvalError("--batch-size and --limit must be >= 1")
    source, note = open_source(Path(opts.shards), opts.split, stage, opts.features)
    samples = source.samples if opts.limit is None else min(opts.limit, source.samples)
    if samples == 0:
        raise EvalError(f"{opts.shards}: the {opts.split!r} split has no samples")
    out_dir = Path(opts.out) if opts.out is not None else stage.directory / "eval"

    dist_env = distributed.detect()
    if dist_env.world_size > 1:
        distributed.export(dist_env)
        torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    rank, world = dist_env.rank, dist_env.world_size
    if note and rank == 0:
        print(f"litegpt evaluate: {note}", file=sys.stderr)
    model = load_model(stage, with_encoders=source.visual is Visual.LIVE, device=inference_device())
    part = out_dir / "parts" / f"rank-{rank:05d}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(part, predict_part(model, stage, source, opts, tasks, rank, world, samples))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None

    parts = [read_predictions(out_dir / "parts" / f"rank-{r:05d}.jsonl") for r in range(world)]
    predictions = merge_parts(parts, chunk_sizes(samples, opts.batch_size), len(tasks))
    write_predictions(out_dir / "predictions.jsonl", predictions)
    shutil.rmtree(out_dir / "parts")
    metrics = compute_metrics(predictions)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    settings = {"run": str(stage.directory), "shards": str(opts.shards), "split": opts.split, "samples": samples,
                "tasks": list(tasks), "task_token": stage.task_token, "batch_size": opts.batch_size,
                "decoding": dataclasses.asdict(opts.decoding), "source": source.description, "world_size": world,
                "export": stage.info, "litegpt_version": __version__}
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    write_outputs(stage, source, metrics, predictions, out_dir, opts.overlays)
    return out_dir, metrics


def write_outputs(stage: Stage, source: Source, metrics: dict, predictions: Sequence[Prediction], out_dir: Path,
                  overlays: int) -> None:
    """report.md and fresh overlays/, and the scalars and a few overlays in the stage's TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    from litegpt.eval.report import log_tensorboard, write_report

    shutil.rmtree(out_dir / "overlays", ignore_errors=True)
    files = write_report(metrics, predictions, out_dir, images=ShardImages(source.image_urls), overlays=overlays)
    writer = SummaryWriter(str(stage.directory / "tensorboard"))
    try:
        log_tensorboard(writer, metrics, int(stage.info.get("step", 0)), overlays=files.overlays[:TENSORBOARD_OVERLAYS])
    finally:
        writer.close()


def summary_table(metrics: dict) -> str:
    """The headline numbers (%), the authors' definitions beside the strict ones."""
    values = scalars(metrics)

    def pct(name: str | None) -> str:
        return "—" if name is None or name not in values else f"{100 * values[name]:.2f}"

    rows = [(f"{scope} labels micro-F1", f"reference/{scope}/micro_avg_f1", f"strict/{scope}/micro_avg_f1")
            for scope in ("local", "global")]
    rows += [(f"Acc@{t} (strict: box recall)", f"reference/accuracy@{t}", f"strict/box_recall@{t}")
             for t in metrics["thresholds"]]
    rows += [("box F1@0.5", None, "strict/box_f1@0.5"), ("mAP@0.4", None, "strict/map@0.4"),
             ("parse rate", None, "parse/all_rate")]
    lines = [f"{'':<32}{'reference':>10}{'strict':>10}"]
    lines += [f"{title:<32}{pct(ref):>10}{pct(strict):>10}" for title, ref, strict in rows]
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="a trained stage, e.g. runs/tiny/stage1")
    parser.add_argument("--shards", type=Path, required=True, help="image shard directory, e.g. shards/demo")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the split's first N samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", default=None, help="comma-separated, e.g. identify,vqa (default: the stage's)")
    parser.add_argument("--features", choices=("auto", "cache", "live"), default="auto",
                        help="auto: the feature cache if the shards have one for these encoders, else live encoders")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <run>/eval)")
    parser.add_argument("--overlays", type=int, default=OVERLAYS, help=f"overlay images (default {OVERLAYS})")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from litegpt.data.shards import ShardError
    from litegpt.features import FeatureCacheError

    try:
        opts = EvalOptions(run=args.run, shards=args.shards, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, features=None if args.features == "auto" else Visual(args.features), out=args.out, overlays=args.overlays,
                           tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None,
                           decoding=decoding_from_args(args))
        result = evaluate(opts)
    except (EvalError, ShardError, FeatureCacheError, ConfigError, FileNotFoundError) as exc:
        print(f"litegpt evaluate: {exc}", file=sys.stderr)
        return 1
    if result is None:
        return 0
    out_dir, metrics = result
    print(summary_table(metrics))
    print(f"\n{metrics['counts']['records']} predictions over {metrics['counts']['images']} images")
    for name in ("predictions.jsonl", "metrics.json", "report.md", "overlays", "settings.json"):
        print(f"  {out_dir / name}")
    print(f"  TensorBoard: {Path(opts.run) / 'tensorboard'}")
    return 0
