"""Training throughput: the harness (train.py, DeepSpeed ZeRO-2) against a bare PyTorch loop on the same batches.

Every side trains the same model from the same initial weights on the same micro-batches, in the same order:
the batches the harness's stream yields (grouped by answer length), taken once in this process and held in
memory for the in-process sides; train.py reads them from its own stream (checked: the first steps' losses
agree). The sides, interleaved round after round so that a change in the machine's load touches them alike:

- bare PyTorch: forward, backward, clipping, AdamW and the schedule of `litegpt.train.optim`, nothing else;
- DeepSpeed engine: the ZeRO-2 engine train.py builds, driven directly (forward, `backward`, `step`);
- Trainer, batches in memory: `litegpt.train.trainer.Trainer.fit` with its monitor, no loader;
- train.py: the harness as a user runs it (one rank, one loader worker), in a fresh process;
- train.py of another checkout (`--compare DIR`, e.g. a `git worktree` of an earlier commit), same data.

A rate is the timed samples over the timed seconds, after `--warmup` steps (train.py's: from its monitor's
windows). Prints samples/s, tokens/s, TFLOP/s and MFU (when the peak is known: a GPU, or --peak-tflops), and
for the in-process sides the process's CPU time per sample, which other jobs on a shared machine change far
less than the wall time.

    python benchmarks/train_step.py --preset tiny --micro-batch 4,16                   # CPU
    python benchmarks/train_step.py --preset tiny --compare /tmp/before                # before / after a change
    python benchmarks/train_step.py --preset paper --micro-batch 1,2,4 --samples 400   # GPU: random 7B, bf16

`--preset paper` replaces every weight source by random initialisation of the same architecture (random
weights run at the speed of real ones) and uses the tiny preset's tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECKED_STEPS = 5  # the first steps whose losses every side must share
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what `start_ranks` exports


def random_weights(cfg, workdir: Path):
    """The preset with local tiny weights built, or (no local source) random weights of its architecture."""
    from litegpt.model.config import load_model_config
    from litegpt.model.tiny import build_weights

    tiny = load_model_config(ROOT / "configs/model_tiny.yaml")
    tiny = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, source=str(workdir / "tiny-llm")))
    encoders = tuple(dataclasses.replace(e, source=str(workdir / f"tiny-{e.name}")) for e in tiny.vision.encoders)
    tiny = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, encoders=encoders))
    build_weights(tiny)
    if cfg.llm.source and Path(cfg.llm.source).name == "llm":  # the tiny preset itself
        return tiny
    encoders = tuple(dataclasses.replace(e, source=None) for e in cfg.vision.encoders)
    llm = dataclasses.replace(cfg.llm, source=None, tokenizer=tiny.llm.source, load_in_8bit=False)
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, encoders=encoders), llm=llm,
                               minigpt_checkpoint=None)


def dataset(workdir: Path, cfg, images: int) -> Path:
    """Synthetic DICOMs -> shards -> the feature cache (two samples per image: identify and vqa)."""
    from litegpt.data.policy import PolicyConfig
    from litegpt.data.prepare import PrepareConfig, prepare
    from litegpt.data.synth import synthesize
    from litegpt.features import build_cache

    root = synthesize(workdir / "vindr", images, 0, seed=5, max_side_px=300, progress=False)
    shards = workdir / "shards"
    prepare(PrepareConfig(root=root, out=shards, samples_per_shard=64, workers=1, policy=PolicyConfig("union")))
    build_cache(shards, cfg.vision, device="cuda" if torch.cuda.is_available() else "cpu", progress=False)
    return shards


def write_recipe(workdir: Path, shards: Path, micro: int, steps: int, every: int, bf16: bool) -> Path:
    """The stage recipe every side follows: `steps` optimizer steps of one micro-batch, no checkpoint before
    the last step, a report every `every` steps."""
    recipe = {
        "model": str(workdir / "model.yaml"),
        "run": {"dir": str(workdir / "runs"), "seed": 0},
        "stage": {"name": f"bench{micro}", "tasks": ["identify", "vqa"], "findings_only": False},
        "data": {"shards": str(shards), "features": "cache", "num_workers": 1, "shuffle_buffer": 64},
        "train": {"micro_batch": micro, "epochs": 1, "max_steps": steps, "precision": "bf16" if bf16 else "fp32"},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "checkpoint": {"save_every": 10**9},
        "log": {"every": every},
    }
    path = workdir / f"recipe-{micro}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def stream_batches(recipe) -> list:
    """The micro-batches train.py trains on, in its order: its stream's first epoch, up to `max_steps`."""
    from litegpt.features import open_cache
    from litegpt.train.stream import TrainStream

    cfg = recipe.cfg
    cache = open_cache(Path(cfg.data.shards), recipe.model_cfg.vision, cfg.model).directory
    stream = TrainStream.from_recipe(cfg, recipe.model_cfg, cache, 0, 1)
    if stream.micro_batches_per_epoch < cfg.train.max_steps:
        raise SystemExit(f"{stream.micro_batches_per_epoch} micro-batches per epoch: raise --images")
    batches = stream.batches(0, per_epoch=cfg.train.max_steps)
    return [next(batches)[1] for _ in range(cfg.train.max_steps)]


def sizes(batches: list, model) -> dict:
    """Samples, non-padding tokens and model FLOPs of these batches."""
    from litegpt.train.monitor import flop_model_of

    flops = flop_model_of(model)
    tokens = [int(b.attention_mask.sum()) for b in batches]
    return {"samples": sum(len(b.keys) for b in batches), "tokens": sum(tokens),
            "flops": sum(flops.step_flops(t, b.input_ids.shape[1], model.image_tokens * len(b.keys))
                         for t, b in zip(tokens, batches))}


def rate(batches: list, model, seconds: float, cpu_seconds: float) -> dict:
    s = sizes(batches, model)
    return {"samples_per_s": s["samples"] / seconds, "tokens_per_s": s["tokens"] / seconds,
            "tflops": s["flops"] / seconds / 1e12, "cpu_ms_per_sample": 1e3 * cpu_seconds / s["samples"]}


def fresh_model(recipe):
    """The model as train.py builds it: seeded, with the recipe's optimizer and schedule."""
    from litegpt.model.model import build_model
    from litegpt.train.optim import build_optimizer

    torch.manual_seed(recipe.cfg.run.seed)
    model = build_model(recipe.model_cfg, with_encoders=False)
    optimizer, scheduler = build_optimizer(model, recipe.cfg.optim, recipe.cfg.train.max_steps)
    return model, optimizer, scheduler


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_loop(recipe, batches: list, warmup: int, fp16_autocast: bool = False) -> tuple[dict, list[float]]:
    """Plain PyTorch: the same model, batches, optimizer, schedule and clipping, nothing else. `fp16_autocast`:
    the authors' precision instead (half-precision base weights, fp32 trainable ones, fp16 autocast, loss scaling)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, optimizer, scheduler = fresh_model(recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model = model.to(device, torch.float16 if fp16_autocast else torch.bfloat16 if recipe.bf16 else None)
    if fp16_autocast:
        for param in trainable:
            param.data = param.data.float()
    scaler = torch.amp.GradScaler(device, enabled=fp16_autocast)
    clip = recipe.deepspeed["gradient_clipping"]
    model.train()
    losses = []
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device, torch.float16, enabled=fp16_autocast):
            loss = model(batch.to(device)).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    return rate(batches[warmup:], model, time.perf_counter() - start, time.process_time() - cpu), \
        [v.item() for v in losses]


def engine_loop(recipe, batches: list, warmup: int) -> tuple[dict, list[float]]:
    """DeepSpeed's ZeRO-2 engine as train.py configures it, driven directly on the same batches."""
    import deepspeed

    model, optimizer, scheduler = fresh_model(recipe)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=recipe.deepspeed)
    losses = []
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start, cpu = time.perf_counter(), time.process_time()
        loss = engine(batch.to(engine.device)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    sync()
    return rate(batches[warmup:], model, time.perf_counter() - start, time.process_time() - cpu), \
        [v.item() for v in losses]


class Prebuilt:
    """A stream of batches already in memory (the Trainer's `MicroBatches`); notes the process's CPU time
    when batch `warmup` and the last batch are asked for (the steps between are timed)."""

    def __init__(self, batches: list, warmup: int):
        self.items, self.warmup, self.cpu = batches, warmup, []

    def batches(self, epoch: int, skip: int = 0, per_epoch: int | None = None):
        for i, batch in enumerate(self.items[skip:per_epoch], skip):
            if i in (self.warmup, len(self.items) - 1):
                self.cpu.append(time.process_time())
            yield epoch, batch


def trainer_loop(recipe_path: Path, run_dir: Path, batches: list, warmup: int) -> tuple[dict, list[float]]:
    """train.py's Trainer (engine, monitor, metrics files) in this process, fed from memory: no loader."""
    from litegpt.train.config import load_recipe
    from litegpt.train.launch import build_trainer

    recipe = load_recipe(recipe_path, [f"run.dir={run_dir}"], ROOT / "ds_configs/zero2.json", 1)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        trainer = build_trainer(recipe, 0, 1, resume=False)  # its progress bar as train.py's, not shown
        trainer.stream = stream = Prebuilt(batches, warmup)
        trainer.fit()
        trainer.close()
    out, losses = monitored(recipe.cfg.stage_dir, warmup)
    timed = sum(len(b.keys) for b in batches[warmup:-1])
    return {**out, "cpu_ms_per_sample": 1e3 * (stream.cpu[1] - stream.cpu[0]) / timed}, losses


def train_py(root: Path, recipe_path: Path, run_dir: Path, warmup: int) -> tuple[dict, list[float]]:
    """train.py of checkout `root` on one rank, in a fresh process, as a user runs it."""
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["run"]["dir"] = str(run_dir)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}  # its own single rank, not ours
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run([sys.executable, str(root / "train.py"), "--config", str(path), "--deepspeed",
                           str(ROOT / "ds_configs/zero2.json"), "--resume", "none"], env=env, cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{root / 'train.py'} failed:\n{done.stderr[-3000:]}")
    return monitored(run_dir / recipe["stage"]["name"], warmup)


def monitored(stage_dir: Path, warmup: int) -> tuple[dict, list[float]]:
    """Rates from a run's metrics.jsonl, total over total: the reports after warm-up cover consecutive
    windows, each lasting its samples / its rate; and the run's losses."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    micro = yaml.safe_load((stage_dir / "config.yaml").read_text())["train"]["micro_batch"]
    reports = [r for r in rows if "samples_per_s" in r]
    windows = [(r, (r["step"] - before) * micro) for r, before in zip(reports, [0] + [r["step"] for r in reports])
               if before >= warmup]
    seconds = [samples / r["samples_per_s"] for r, samples in windows]
    total = sum(seconds)
    out = {"samples_per_s": sum(samples for _, samples in windows) / total}
    for key, name in (("tokens_per_s", "tokens_per_s"), ("tflops", "tflops_per_device"), ("data_share", "data_share")):
        out[key] = sum(r[name] * t for (r, _), t in zip(windows, seconds)) / total
    return out, [r["loss"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny, paper, or a model config path")
    parser.add_argument("--micro-batch", default="4,16", help="comma-separated sweep, e.g. 1,2,4")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (and train.py's report interval)")
    parser.add_argument("--samples", type=int, default=3200, help="timed samples per side (steps = samples / micro)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout whose train.py also runs")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    from litegpt import distributed
    from litegpt.model.config import load_model_config
    from litegpt.train.config import load_recipe
    from litegpt.train.launch import start_ranks
    from litegpt.train.monitor import device_peak_tflops

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    start_ranks(distributed.DistEnv(0, 0, 1, "127.0.0.1", distributed.free_port(), "single"))
    path = {"tiny": ROOT / "configs/model_tiny.yaml", "paper": ROOT / "configs/model_paper.yaml"}.get(args.preset,
                                                                                                    Path(args.preset))
    peak = device_peak_tflops(args.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s) per side"
    micros = [int(m) for m in args.micro_batch.split(",")]
    steps = {m: args.warmup + math.ceil(args.samples / m / args.warmup) * args.warmup for m in micros}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = random_weights(load_model_config(path), workdir)
        (workdir / "model.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
        shards = dataset(workdir, cfg, max(m * s for m, s in steps.items()) // 2 + 64)
        recipes = {m: write_recipe(workdir, shards, m, steps[m], args.warmup, False) for m in micros}
        loaded = {m: load_recipe(p, [], ROOT / "ds_configs/zero2.json", 1) for m, p in recipes.items()}
        batches = {m: stream_batches(loaded[m]) for m in micros}
        bf16 = any(r.bf16 for r in loaded.values())
        print(f"preset {args.preset} ({path.name}), {device}, {'bf16' if bf16 else 'fp32'}, warm-up {args.warmup} "
              f"steps, then {args.samples} samples per side; {args.rounds} interleaved rounds\n", flush=True)

        sides = {"bare PyTorch": lambda m, r: bare_loop(loaded[m], batches[m], args.warmup),
                 "DeepSpeed engine": lambda m, r: engine_loop(loaded[m], batches[m], args.warmup),
                 "Trainer, batches in memory": lambda m, r: trainer_loop(recipes[m], workdir / f"trainer-{m}-{r}",
                                                                         batches[m], args.warmup),
                 "train.py": lambda m, r: train_py(ROOT, recipes[m], workdir / f"run-{m}-{r}", args.warmup)}
        if args.compare is not None:
            sides[f"train.py of {args.compare}"] = lambda m, r: train_py(args.compare.resolve(), recipes[m],
                                                                        workdir / f"before-{m}-{r}", args.warmup)
        results: dict[tuple[int, str], list[dict]] = {}
        for r in range(args.rounds):
            for m in micros:
                names = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in names:
                    row, losses = sides[name](m, r)
                    results.setdefault((m, name), []).append(row)
                    print(f"round {r + 1}, micro-batch {m}, {name}: {row['samples_per_s']:.1f} samples/s", flush=True)
                    if r == 0:
                        print(f"micro-batch {m}, {name}: first losses "
                              f"{' '.join(f'{v:.6f}' for v in losses[:CHECKED_STEPS])}", flush=True)
                        results.setdefault((m, "losses"), []).append(losses[:CHECKED_STEPS])
        for m in micros:
            first = results[(m, "losses")]
            spread = max(abs(a - b) for losses in first for a, b in zip(losses, first[0]))
            print(f"micro-batch {m}: the first {CHECKED_STEPS} losses of every side agree within {spread:.1e}")
            if spread > 1e-3:
                raise SystemExit("the sides did not train on the same batches")

        print("\n| micro-batch | loop | samples/s | tokens/s | TFLOP/s | MFU | loader wait | / bare (per round) | "
              "CPU ms / sample | bare / it (CPU) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for m in micros:
            bare = results[(m, "bare PyTorch")]
            bare_cpu = sum(r["cpu_ms_per_sample"] for r in bare) / len(bare)
            for name in sides:
                rows = results[(m, name)]
                mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
                mfu = f"{mean['tflops'] / peak:.1%}" if peak else "-"
                wait = f"{mean['data_share']:.0%}" if "data_share" in mean else "-"
                ratios = ", ".join(f"{a['samples_per_s'] / b['samples_per_s']:.2f}" for a, b in zip(rows, bare))
                cpu, cpu_ratio = "-", ""
                if "cpu_ms_per_sample" in mean:
                    cpu = f"{mean['cpu_ms_per_sample']:.1f}"
                    cpu_ratio = "" if rows is bare else f"{bare_cpu / mean['cpu_ms_per_sample']:.2f}"
                print(f"| {m} | {name} | {mean['samples_per_s']:.1f} | {mean['tokens_per_s']:,.0f} | "
                      f"{mean['tflops']:.3f} | {mfu} | {wait} | {'' if rows is bare else ratios} | {cpu} | "
                      f"{cpu_ratio} |")


if __name__ == "__main__":
    main()
