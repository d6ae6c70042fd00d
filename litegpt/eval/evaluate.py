"""`litegpt evaluate`: a trained stage's export on a shard split -> predictions, the paper's metrics, a report.

    litegpt evaluate --run runs/<run>/<stage> --shards shards/<name> [--split test] [--limit N] ...
    torchrun --nproc-per-node 8 -m -- litegpt.cli evaluate --run ...
    deepspeed --num_gpus 8 --no_local_rank --module litegpt.cli evaluate --run ...
    srun python -m litegpt.cli evaluate --run ...

(torchrun needs the `--`: its parser would take `--run` for an abbreviation of its own `--run-path`;
deepspeed needs `--no_local_rank`: the rank arrives in LOCAL_RANK, not as an argument.)

Text: the export's grammar (`TrainedStage.grammar`) renders the prompts and targets and parses the outputs;
the shard set's label vocabulary (its manifest's) must be the export's, else evaluation is refused naming both.

Visual input: the shards' feature cache for the export's encoders when there is one (`--features auto`),
else the encoders run live on the PNGs; both paths round features alike (see `litegpt.model.model`).

Work split: the split's first `--limit` samples are cut, in shard order, into chunks of `--batch-size`;
rank r takes chunks r, r + W, ...; a chunk is one generation batch per task, seeded by (seed, chunk, task).
So every batch, and hence every prediction (sampled ones included), is the same whatever the number of
ranks. Each rank writes `parts/rank-NNNNN.jsonl`; after a barrier (gloo: it is the only collective, so
no GPU communicator is needed) rank 0 merges the parts in chunk order and writes `predictions.jsonl`,
`metrics.json`, `report.md`, `overlays/` and `settings.json`, and logs to the stage's `tensorboard/`.

Loading the export, generation and box scores are `litegpt.eval.inference`, shared with `litegpt predict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image

from litegpt import __version__
from litegpt.data.integrity import verify_shard_set
from litegpt.data.shards import MANIFEST, ShardError, read_manifest, read_samples, shard_paths
from litegpt.eval.inference import (
    PRESETS,
    Decoding,
    EvalError,
    TrainedStage,
    add_generation_arguments,
    box_scores,
    decoding_from_args,
    generate,
    inference_device,
    load_model,
    load_stage,
)
from litegpt.eval.metrics import Prediction, compute_metrics, read_predictions, write_predictions
from litegpt.eval.report import OVERLAYS, scalars
from litegpt.features import FeatureCacheError, open_cache, visual_decoder
from litegpt.grammar import TASKS
from litegpt.labels import Vocabulary, VocabularyError, VocabularyMismatch
from litegpt.model.config import ConfigError, Visual
from litegpt.model.export import CONFIG

TENSORBOARD_OVERLAYS = 4
# A rank that finishes early waits at the barrier for the slowest; launchers end the whole job if a rank dies.
BARRIER_TIMEOUT = timedelta(hours=12)


# ---- reading the split ------------------------------------------------------------------------------

class ShardImages:
    """image_id -> its shard PNG, for the report's overlays. They are requested in prediction order, which is
    shard order, so one forward pass over the shards serves them all; an earlier id restarts the pass."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = paths
        self._samples: Iterator[dict] = iter(())

    def __call__(self, image_id: str) -> Image.Image:
        for _ in range(2):
            for raw in self._samples:
                if raw["__key__"] == image_id:
                    return Image.open(io.BytesIO(raw["png"]))
            self._samples = read_samples(self.paths)
        raise KeyError(f"image {image_id!r} is not in the image shards")


@dataclass(frozen=True)
class SplitShards:
    """One split of a shard set as evaluation reads it: what to stream, and where its images are."""

    stream: list[Path]  # shards streamed for generation: the feature cache's, or the image shards
    images: list[Path]  # image shards (overlays)
    samples: int  # samples of the split, as the manifest counts them
    visual: Visual  # what `stream` holds
    description: str


def check_vocabulary(stage: TrainedStage, shards: Path, manifest: dict) -> None:
    """The shard set's labels must be the ones the stage trained on: its outputs are read with those."""
    try:
        labels = Vocabulary.of_manifest(manifest)
        stage.grammar.vocabulary.require_same(labels, f"the export {stage.export}", f"the shard set {shards}")
    except VocabularyError as exc:
        raise EvalError(f"{Path(shards) / MANIFEST}: {exc}") from None
    except VocabularyMismatch as exc:
        raise EvalError(str(exc)) from None


def open_split(shards: Path, split: str, stage: TrainedStage,
               features: Visual | None) -> tuple[SplitShards, str | None]:
    """The split's shards to stream, and a note when `auto` (None) falls back to live encoders; the shard set
    must have the stage's label vocabulary."""
    manifest = read_manifest(shards)
    check_vocabulary(stage, shards, manifest)
    splits = sorted({s["split"] for s in manifest["shards"]})
    if split not in splits:
        raise EvalError(f"{shards} has no {split!r} split (its splits: {', '.join(splits) or 'none'})")
    images = shard_paths(shards, split, verify_shard_set(shards, split, manifest))
    count = sum(s["samples"] for s in manifest["shards"] if s["split"] == split)
    note = None
    if features is not Visual.LIVE:
        try:
            cache = open_cache(shards, stage.model_cfg.vision, stage.export / CONFIG)
            return SplitShards(cache.shard_paths(split), images, count, Visual.CACHE,
                               f"feature cache {cache.directory}"), None
        except FeatureCacheError as exc:
            if features is Visual.CACHE:
                raise
            note = f"no usable feature cache, running the encoders on the PNGs ({exc})"
    return SplitShards(images, images, count, Visual.LIVE, f"live encoders on {shards}"), note


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


def rank_chunks(split: SplitShards, samples: int, batch_size: int, rank: int,
                world: int) -> Iterator[tuple[int, list[dict]]]:
    """(chunk index, undecoded samples) of this rank's chunks of the first `samples`; every rank reads them all.

    A sample is {"__key__", "json": bytes, "png" or "<encoder>.npy": bytes} (`shards.read_samples`).
    """
    stream = itertools.islice(read_samples(split.stream), samples)
    seen = 0
    for chunk, raws in enumerate(iter(lambda: list(itertools.islice(stream, batch_size)), [])):
        seen += len(raws)
        if chunk % world == rank:
            yield chunk, raws
    if seen != samples:
        raise EvalError(f"{split.description}: {seen} samples read, the manifest promises {samples}")


def predict_part(model, stage: TrainedStage, split: SplitShards, opts: EvalOptions, tasks: Sequence[str], rank: int,
                 world: int, samples: int) -> list[Prediction]:
    """This rank's predictions: its chunks, in order, each chunk task by task."""
    from tqdm import tqdm

    decode = visual_decoder(split.visual, model.vision.preprocess if model.vision is not None else None)
    sizes = chunk_sizes(samples, opts.batch_size)
    bar = tqdm(total=sum(n for c, n in enumerate(sizes) if c % world == rank), unit="img", desc="evaluate",
               dynamic_ncols=True, disable=rank != 0)
    out: list[Prediction] = []
    for chunk, raws in rank_chunks(split, samples, opts.batch_size, rank, world):
        metas = [json.loads(raw["json"]) for raw in raws]
        visual = [decode(raw) for raw in raws]
        keys = [m["image_id"] for m in metas]
        for task in tasks:
            generations = generate(model, stage, task, keys, visual, split.visual, opts.decoding, chunk)
            out += [Prediction(meta["image_id"], task, gen.text, stage.grammar.answer(task, meta), meta["findings"],
                               meta["diagnoses"], gen.probs, box_scores(model.tokenizer, gen, stage.grammar))
                    for meta, gen in zip(metas, generations)]
        bar.update(len(raws))
    bar.close()
    return out


def checked_tasks(opts: EvalOptions, stage: TrainedStage) -> tuple[str, ...]:
    """The tasks to evaluate (the stage's by default), after checking the options that need no shards."""
    tasks = tuple(dict.fromkeys(opts.tasks or stage.tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    if opts.batch_size < 1 or (opts.limit is not None and opts.limit < 1):
        raise EvalError("--batch-size and --limit must be >= 1")
    return tasks


def _part(out_dir: Path, rank: int) -> Path:
    return out_dir / "parts" / f"rank-{rank:05d}.jsonl"


def evaluate(opts: EvalOptions) -> tuple[Path, dict] | None:
    """Run the evaluation on this rank; rank 0 returns (eval directory, metrics), other ranks None."""
    from litegpt import distributed

    stage = load_stage(opts.run)
    tasks = checked_tasks(opts, stage)
    split, note = open_split(Path(opts.shards), opts.split, stage, opts.features)
    samples = split.samples if opts.limit is None else min(opts.limit, split.samples)
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
    model = load_model(stage, with_encoders=split.visual is Visual.LIVE, device=inference_device())
    _part(out_dir, rank).parent.mkdir(parents=True, exist_ok=True)
    write_predictions(_part(out_dir, rank), predict_part(model, stage, split, opts, tasks, rank, world, samples))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    return out_dir, merge_and_score(stage, split, opts, tasks, samples, world, out_dir)


def merge_and_score(stage: TrainedStage, split: SplitShards, opts: EvalOptions, tasks: Sequence[str], samples: int,
                    world: int, out_dir: Path) -> dict:
    """Rank 0, after the barrier: the ranks' parts merged into predictions.jsonl, then every output; the metrics."""
    parts = [read_predictions(_part(out_dir, r)) for r in range(world)]
    predictions = merge_parts(parts, chunk_sizes(samples, opts.batch_size), len(tasks))
    write_predictions(out_dir / "predictions.jsonl", predictions)
    shutil.rmtree(out_dir / "parts")
    metrics = compute_metrics(predictions, stage.grammar)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    settings = {"run": str(stage.directory), "shards": str(opts.shards), "split": opts.split, "samples": samples,
                "tasks": list(tasks), "task_token": stage.task_token, "batch_size": opts.batch_size,
                "decoding": dataclasses.asdict(opts.decoding), "source": split.description, "world_size": world,
                "export": stage.info, "litegpt_version": __version__}
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    write_outputs(stage, split, metrics, predictions, out_dir, opts.overlays)
    return metrics


def write_outputs(stage: TrainedStage, split: SplitShards, metrics: dict, predictions: Sequence[Prediction],
                  out_dir: Path, overlays: int) -> None:
    """report.md and fresh overlays/, and the scalars and a few overlays in the stage's TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    from litegpt.eval.report import log_tensorboard, write_report

    shutil.rmtree(out_dir / "overlays", ignore_errors=True)
    files = write_report(metrics, predictions, out_dir, stage.grammar, images=ShardImages(split.images),
                         overlays=overlays)
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
    rows += [("box F1@0.5", None, "strict/box_f1@0.5"), ("mAP@0.4 (COCOeval)", None, "strict/map@0.4"),
             ("mAP@0.4 (Kaggle, VOC 2010 AP)", None, "strict/kaggle_map@0.4"),
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


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    return EvalOptions(run=args.run, shards=args.shards, split=args.split, limit=args.limit,
                       batch_size=args.batch_size, tasks=tasks, decoding=decoding_from_args(args),
                       features=None if args.features == "auto" else Visual(args.features), out=args.out,
                       overlays=args.overlays)


def run(args: argparse.Namespace) -> int:
    try:
        result = evaluate(options_from_args(args))
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
    print(f"  TensorBoard: {Path(args.run) / 'tensorboard'}")
    return 0
