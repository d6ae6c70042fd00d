"""`litegpt demo`: the whole pipeline on the tiny preset and synthetic data, run as a user would run it.

    synth -> prepare -> inspect -> tiny-weights -> cache-features -> stage 1 -> stage 2 -> evaluate each stage

Every step is the public command in a subprocess (training through `deepspeed` on CPU ranks), so the
demo exercises the README's commands, not an in-process shortcut. Each stage is evaluated on its own
task (stage 1's export on `[identify]`; stage 2, which trains `[vqa]` only, on `[vqa]`), and the model
is printed beside the training-prior baseline (`litegpt.eval.baseline`) scored by the same `compute_metrics`:
beating it is what shows that the model reads the image.

Re-running resumes: synth rewrites identical files, prepare and cache-features keep what is complete,
train.py continues from its last checkpoint. A checkpoint does not know the data it was trained on, so
the demo records its dataset flags and refuses other ones unless `--fresh` wipes its outputs first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from litegpt.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
MODEL = "configs/model_tiny.yaml"
RECIPES = {"stage1": "configs/tiny/stage1.yaml", "stage2": "configs/tiny/stage2.yaml"}
DEEPSPEED_CONFIG = "ds_configs/zero2.json"
# The demo's synthetic data: small images (the encoders see 224 px anyway) and few normal images, since
# stage 1 trains on images with findings only; shards small enough to give each rank several.
MAX_SIDE_PX = 400
NO_FINDING_FRAC = 0.2
SAMPLES_PER_SHARD = 128
STEPS = 9
ROWS = (  # (title, name in litegpt.eval.report.scalars, the stage trained on that task)
    ("local labels micro-F1, strict", "strict/local/micro_avg_f1", "stage1"),
    ("local labels micro-F1, reference", "reference/local/micro_avg_f1", "stage1"),
    ("box F1@0.5, strict", "strict/box_f1@0.5", "stage1"),
    ("Acc@0.5, reference", "reference/accuracy@0.5", "stage1"),
    ("global labels micro-F1, strict", "strict/global/micro_avg_f1", "stage2"),
    ("parse rate [identify]", "parse/identify_rate", "stage1"),
    ("parse rate [vqa]", "parse/vqa_rate", "stage2"),
)


class DemoError(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Layout:
    """Where the demo writes: by default the paths the tiny recipes name, so their commands work as shown."""

    synth: Path
    shards: Path
    runs: Path

    @classmethod
    def under(cls, out: Path | None) -> Layout:
        if out is None:
            recipe = yaml.safe_load((REPO / RECIPES["stage1"]).read_text())
            return cls(REPO / "demo" / "vindr", REPO / recipe["data"]["shards"], REPO / recipe["run"]["dir"])
        out = out.resolve()
        return cls(out / "vindr", out / "shards", out / "runs")

    @property
    def pictures(self) -> Path:
        return self.synth.parent / "inspect"

    @property
    def record(self) -> Path:
        return self.runs / "demo.json"


def _shown(*args: str | Path) -> str:
    """A command or path as typed from the repository root, with this environment's scripts by name."""
    def short(arg: str | Path) -> str:
        text = str(arg)
        for prefix in (str(Path(sys.executable).parent) + os.sep, str(REPO) + os.sep):
            if text.startswith(prefix):
                return text[len(prefix):]
        return text

    return " ".join(short(a) for a in args)


def _tool(name: str) -> list[str]:
    """A console script of this environment (`litegpt`, `deepspeed`), beside the running interpreter."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    if name == "litegpt":
        return [sys.executable, "-m", "litegpt.cli"]
    raise DemoError(f"{name} is not installed in {Path(sys.executable).parent}", 2)


class Pipeline:
    """Numbered steps, each one command run from the repository root; a failure stops the demo."""

    def __init__(self, layout: Layout):
        self.layout, self.done = layout, 0
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1"}

    def step(self, what: str, cmd: list[str]) -> None:
        self.done += 1
        print(f"\n[{self.done}/{STEPS}] {what}\n$ {_shown(*cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, check=False, cwd=REPO, env=self.env).returncode
        if rc != 0:
            raise DemoError(f"step {self.done} ({what}) failed with exit code {rc}; fix it and re-run "
                            "`litegpt demo` to resume", rc)
        print(f"[{self.done}/{STEPS}] done in {time.perf_counter() - start:.0f} s", flush=True)

    def train(self, stage: str, ranks: int) -> None:
        """deepspeed train.py on the stage's tiny recipe, pointed at this demo's shards and runs if elsewhere."""
        recipe = yaml.safe_load((REPO / RECIPES[stage]).read_text())
        wanted = {"run.dir": (recipe["run"]["dir"], self.layout.runs),
                  "data.shards": (recipe["data"]["shards"], self.layout.shards)}
        if recipe["stage"]["init_from"]:
            wanted["stage.init_from"] = (recipe["stage"]["init_from"], self.layout.runs / "stage1" / "export")
        overrides = [arg for key, (current, path) in wanted.items() if (REPO / current).resolve() != path
                     for arg in ("--set", f"{key}={path}")]
        cmd = [*_tool("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), "train.py",
               "--deepspeed", DEEPSPEED_CONFIG, "--config", RECIPES[stage], *overrides]
        self.step(f"train {stage} ({', '.join(recipe['stage']['tasks'])}) on {ranks} CPU ranks", cmd)


def comparison(model: dict[str, dict], baseline: dict) -> str:
    """Model beside baseline, in %, each row from the stage trained on its task."""
    from litegpt.eval.report import scalars

    values = {stage: scalars(metrics) for stage, metrics in model.items()}
    prior = scalars(baseline)

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    lines = [f"{'test split':<36}{'model':>8}{'prior':>8}  (model: the stage trained on that task)"]
    lines += [f"{title:<36}{pct(values[stage].get(name)):>8}{pct(prior.get(name)):>8}  {stage}"
              for title, name, stage in ROWS]
    return "\n".join(lines)


def write_baseline(shards: Path, out: Path) -> dict:
    """Fit the prior on the train split, answer the test split, score it in the shards' grammar; writes
    predictions and metrics."""
    from litegpt.eval.baseline import baseline
    from litegpt.eval.metrics import compute_metrics, write_predictions

    grammar, predictions = baseline(shards)
    metrics = compute_metrics(predictions, grammar)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.jsonl", predictions)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _claim(layout: Layout, dataset: dict, fresh: bool) -> None:
    """Start over (--fresh), or check that earlier outputs were made from the same dataset flags."""
    if fresh:
        for path in (layout.synth, layout.shards, layout.runs):
            if path.exists():
                print(f"removing {_shown(path)}")
                shutil.rmtree(path)
    if layout.record.is_file():
        before = json.loads(layout.record.read_text())
        if before != dataset:
            raise DemoError(f"{_shown(layout.runs)} was trained on another dataset ({before}, now {dataset}); "
                            "pass the same values to resume, or --fresh to start over", 2)
    layout.runs.mkdir(parents=True, exist_ok=True)
    layout.record.write_text(json.dumps(dataset))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="write data, shards and runs under this directory (default: demo/vindr, shards/demo "
                             "and runs/tiny in the repository, the paths the tiny recipes name)")
    parser.add_argument("--train", type=int, default=6000, help="synthetic training images (default 6000)")
    parser.add_argument("--test", type=int, default=300, help="synthetic test images (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset (default 0)")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks for deepspeed (default 2)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this demo's earlier outputs first and rewrite the tiny weights")


def run(args: argparse.Namespace) -> int:
    if not (REPO / "train.py").is_file():
        print(f"litegpt demo: needs the source checkout (train.py, configs/); not found at {REPO}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    layout = Layout.under(args.out)
    pipeline = Pipeline(layout)
    try:
        _claim(layout, {"train": args.train, "test": args.test, "seed": args.seed}, args.fresh)
        litegpt = _tool("litegpt")
        pipeline.step(f"synthesise {args.train} + {args.test} VinDr-shaped DICOMs",
                      [*litegpt, "synth", "--out", str(layout.synth), "--train", str(args.train), "--test",
                       str(args.test), "--seed", str(args.seed), "--max-side-px", str(MAX_SIDE_PX),
                       "--no-finding-frac", str(NO_FINDING_FRAC)])
        pipeline.step("convert them to WebDataset shards",
                      [*litegpt, "prepare", "--root", str(layout.synth), "--out", str(layout.shards),
                       "--samples-per-shard", str(SAMPLES_PER_SHARD)])
        pipeline.step("draw a few training samples with their boxes",
                      [*litegpt, "inspect", str(layout.shards), "--draw", "4", "--draw-dir", str(layout.pictures)])
        pipeline.step("write the tiny preset's random weights and tokenizer",
                      [*litegpt, "tiny-weights", "--config", MODEL, *(["--force"] if args.fresh else [])])
        pipeline.step("run the frozen encoders once (feature cache)",
                      [*litegpt, "cache-features", "--shards", str(layout.shards), "--model", MODEL])
        pipeline.train("stage1", args.ranks)
        pipeline.train("stage2", args.ranks)
        for stage in ("stage1", "stage2"):
            pipeline.step(f"evaluate {stage} on the test split (its own task)",
                          [*litegpt, "evaluate", "--run", str(layout.runs / stage), "--shards", str(layout.shards)])
    except DemoError as exc:
        print(f"litegpt demo: {exc}", file=sys.stderr)
        return exc.code
    metrics = {stage: json.loads((layout.runs / stage / "eval" / "metrics.json").read_text())
               for stage in ("stage1", "stage2")}
    baseline = write_baseline(layout.shards, layout.runs / "baseline")

    print(f"\n{comparison(metrics, baseline)}\n")
    for stage in ("stage1", "stage2"):
        print(f"{stage} report: {_shown(layout.runs / stage / 'eval' / 'report.md')}")
    print(f"boxes on test images (predicted red, truth green): {_shown(layout.runs / 'stage1' / 'eval' / 'overlays')}")
    print(f"training samples with their boxes: {_shown(layout.pictures)}")
    print(f"baseline: {_shown(layout.runs / 'baseline' / 'metrics.json')}")
    print(f"watch the runs: tensorboard --logdir {_shown(layout.runs)} --host 127.0.0.1 (train/*; the validation "
          "curves, on images held out of training, are val/*)")
    for stage in ("stage1", "stage2"):
        best = json.loads((layout.runs / stage / "export-best" / "export.json").read_text())
        print(f"{stage}: best validation {best['best']['figure']} {best['best']['value']:.4f} at step {best['step']}: "
              f"{_shown(layout.runs / stage / 'export-best')} (the last step: {_shown(layout.runs / stage / 'export')})")
    print(f"demo done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
