"""Training throughput: the harness (train.py, DeepSpeed ZeRO-2) against a bare PyTorch loop, side by side.

Both train the same model on the same cached features with the same micro-batch; the bare loop has its
batches ready in memory and calls AdamW directly, so the gap is what the harness costs (data stream,
DeepSpeed engine, checkpoint-free logging). Prints samples/s, tokens/s, TFLOP/s and MFU (when the peak is
known: a GPU, or --peak-tflops).

    python benchmarks/train_step.py --preset tiny                      # CPU
    python benchmarks/train_step.py --preset paper --micro-batch 1,2,4  # GPU: random 7B, bf16

`--preset paper` replaces every weight source by random initialisation of the same architecture (random
weights run at the speed of real ones) and uses the tiny preset's tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    from litegpt.data.policy import PolicyConfig
    from litegpt.data.prepare import PrepareConfig, prepare
    from litegpt.data.synth import synthesize
    from litegpt.features import build_cache

    root = synthesize(workdir / "vindr", images, 0, seed=5, max_side_px=700, progress=False)
    shards = workdir / "shards"
    prepare(PrepareConfig(root=root, out=shards, samples_per_shard=16, workers=1, policy=PolicyConfig("union")))
    build_cache(shards, cfg.vision, device="cuda" if torch.cuda.is_available() else "cpu", progress=False)
    return shards


def bare_loop(cfg, shards: Path, micro: int, warmup: int, steps: int, bf16: bool) -> dict:
    """The same model, data and optimizer, without the harness."""
    from litegpt.features import open_cache
    from litegpt.grammar import render_answer, render_prompt
    from litegpt.model.config import Visual
    from litegpt.model.inputs import TrainSample
    from litegpt.model.model import build_model
    from litegpt.train.monitor import flop_model_of

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(cfg, with_encoders=False).to(device)
    if bf16:
        model = model.to(torch.bfloat16)
    samples = [TrainSample(key, render_prompt("identify"), render_answer("identify", meta), features, Visual.CACHE)
               for key, meta, features in open_cache(shards, cfg.vision).samples("train")]
    batches = [model.inputs.train_batch(samples[i:i + micro]) for i in range(0, len(samples) - micro + 1, micro)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    flops = flop_model_of(model)
    model.train()
    done, tokens, flop_count = 0, 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = batches[i % len(batches)].to(device)
        loss = model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            done += len(batch.keys)
            n_tokens = int(batch.attention_mask.sum())
            tokens += n_tokens
            flop_count += flops.step_flops(n_tokens, batch.input_ids.shape[1], model.image_tokens * len(batch.keys))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"samples_per_s": done / seconds, "tokens_per_s": tokens / seconds, "tflops": flop_count / seconds / 1e12}


def harness(cfg, shards: Path, workdir: Path, micro: int, warmup: int, steps: int, bf16: bool) -> dict:
    """train.py as a user runs it (one rank), timed by its own monitor over the steps after warm-up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_yaml = workdir / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    run_dir = workdir / f"runs-{micro}"
    recipe = {
        "model": str(model_yaml),
        "run": {"dir": str(run_dir), "seed": 0},
        "stage": {"name": "bench", "tasks": ["identify"], "findings_only": False},
        "data": {"shards": str(shards), "features": "cache", "num_workers": 1, "shuffle_buffer": 16},
        "train": {"micro_batch": micro, "epochs": 1000, "max_steps": warmup + steps,
                  "precision": "bf16" if bf16 else "fp32"},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "checkpoint": {"save_every": 10**9},
        "log": {"every": warmup if steps % warmup == 0 else 1},
    }
    path = workdir / f"recipe-{micro}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--deepspeed",
                    str(ROOT / "ds_configs/zero2.json"), "--resume", "none"], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    acc = EventAccumulator(str(run_dir / "bench/tensorboard"))
    acc.Reload()

    def after_warmup(tag: str) -> float:
        events = [e for e in acc.Scalars(tag) if e.step > warmup]
        return sum(e.value for e in events) / len(events)

    result = {"samples_per_s": after_warmup("perf/samples_per_s"), "tokens_per_s": after_warmup("perf/tokens_per_s"),
              "tflops": after_warmup("perf/tflops_per_device")}
    if "perf/mfu" in acc.Tags()["scalars"]:
        result["mfu"] = after_warmup("perf/mfu")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny, paper, or a model config path")
    parser.add_argument("--micro-batch", default="4", help="comma-separated sweep, e.g. 1,2,4")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    from litegpt.model.config import load_model_config
    from litegpt.train.monitor import device_peak_tflops

    path = {"tiny": ROOT / "configs/model_tiny.yaml", "paper": ROOT / "configs/model_paper.yaml"}.get(args.preset,
                                                                                                    Path(args.preset))
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    peak = device_peak_tflops(args.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = random_weights(load_model_config(path), workdir)
        shards = dataset(workdir, cfg, args.images)
        print(f"preset {args.preset} ({path.name}), {device}, {'bf16' if bf16 else 'fp32'}, "
              f"{args.steps} timed steps after {args.warmup}\n")
        print("| micro-batch | loop | samples/s | tokens/s | TFLOP/s | MFU | harness / bare |")
        print("|---|---|---|---|---|---|---|")
        for micro in (int(m) for m in args.micro_batch.split(",")):
            bare = bare_loop(cfg, shards, micro, args.warmup, args.steps, bf16)
            ours = harness(cfg, shards, workdir, micro, args.warmup, args.steps, bf16)
            for name, row in (("bare PyTorch", bare), ("train.py (DeepSpeed ZeRO-2)", ours)):
                mfu = f"{row['tflops'] / peak:.1%}" if peak else "-"
                ratio = f"{ours['samples_per_s'] / bare['samples_per_s']:.2f}" if row is ours else ""
                print(f"| {micro} | {name} | {row['samples_per_s']:.1f} | {row['tokens_per_s']:.0f} | "
                      f"{row['tflops']:.3f} | {mfu} | {ratio} |")


if __name__ == "__main__":
    main()
