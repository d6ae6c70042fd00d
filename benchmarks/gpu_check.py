"""One command that checks a GPU machine: the paper's model at full depth, random weights, every figure at once.

On a GPU machine (an H100/H200 with no package registry) this builds the paper's shapes (`configs/model_paper.yaml`:
BiomedCLIP ViT-B/16 + PubMedCLIP ViT-B/32, the 3840 -> 5632 -> 4096 projector, Llama-2-7B with LoRA r 64 on q/v)
with random weights, the LLM initialised directly on the GPU, and reports as JSON + markdown under `--out`:

- the feature-cache build with the full-size encoders in fp16 (images/s);
- `train.py` stage 1 (ZeRO-2, bf16, one GPU) at each micro-batch: samples/s, tokens/s, model TFLOP/s, MFU,
  peak memory, data-loading share, and whether the loss stayed finite and fell; beside it the authors'
  configuration (fp16 autocast, eager attention, batch 4; without their 8-bit base, which needs bitsandbytes);
- which attention ran: flash-attention-2 if it imports, else PyTorch SDPA and the SDPA kernel that ran;
- batched generation, batch 1 vs 16 (samples/s).

    bash benchmarks/gpu_wheels.sh          # here, with PyPI: wheels + the Llama-2 tokenizer into .whl/
    bash benchmarks/gpu_check.sh OUT       # on the GPU machine (carry .whl): install them, run this
    python benchmarks/gpu_check.py --out DIR --dry-run   # the same code on CPU at 1 layer, in minutes

Random weights run at the speed of real ones; the loss check uses lr 1e-4 instead of the paper's 1e-5 so that a
few steps show it falling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from features import cache_throughput  # noqa: E402  (benchmarks/ scripts share their measurements)
from generate import seconds  # noqa: E402

from litegpt.model.config import load_model_config, model_config_from_dict  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one check runs: the GPU figures, or the same code in miniature on CPU (`--dry-run`)."""

    layers: int
    images: int  # synthetic training images (about half have findings: stage 1's samples)
    test_images: int
    micro_batches: tuple[int, ...]
    warmup: int  # optimizer steps before the timed window
    steps: int  # timed optimizer steps
    authors_batch: int
    generation: tuple[int, int]  # batch sizes compared
    new_tokens: int

    @classmethod
    def of(cls, dry_run: bool) -> Plan:
        if dry_run:
            return cls(layers=1, images=16, test_images=4, micro_batches=(1, 2), warmup=1, steps=2, authors_batch=2,
                       generation=(1, 2), new_tokens=3)
        return cls(layers=32, images=192, test_images=16, micro_batches=(1, 2, 4, 8), warmup=5, steps=15, authors_batch=4,
                   generation=(1, 16), new_tokens=64)


def environment() -> dict:
    """Versions, the device, and the attention implementation the model will get (with the reason)."""
    import deepspeed
    import peft
    import transformers

    from litegpt.model.model import choose_attention

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}",
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "attention": choose_attention("auto"), "sdpa_kernel": sdpa_kernel(),
    }


def sdpa_kernel() -> str:
    """The aten kernel PyTorch's SDPA dispatches to for Llama-2's attention shape (32 heads of 128, causal)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 32, 256, 128, device=device, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    names = [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")
             or e.key.startswith("aten::_flash_attention") or e.key.startswith("aten::_efficient_attention")]
    return ", ".join(sorted(names)) or "none found"


def model_config(out: Path, layers: int, tokenizer: Path | None) -> Path:
    """The paper's model config at `layers` decoder layers: encoders written with random weights in their real
    formats, the LLM left without a source so that it is initialised at load, on the device it will run on."""
    from litegpt.model.reduced import derived_config, llama2_tokenizer
    from litegpt.model.tiny import build_weights

    out = out.resolve()
    data = derived_config(load_model_config(ROOT / "configs/model_paper.yaml"), layers, out)
    if tokenizer is None:
        tokenizer = out / "tokenizer"
        if not tokenizer.is_dir():
            llama2_tokenizer().save_pretrained(tokenizer)
    data["llm"].update(source=None)
    data["minigpt_checkpoint"] = None
    if not torch.cuda.is_available():
        data["vision"]["dtype"] = "float32"  # fp16 encoders are the paper's on a GPU; CPU convolutions want fp32
    build_weights(model_config_from_dict(data, "gpu check model"))  # the encoders: the LLM has no source
    data["llm"]["tokenizer"] = str(tokenizer.resolve())
    path = out / "model.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(model_config_from_dict(data, "gpu check model").to_dict())),
                                   sort_keys=False))
    return path


def dataset(out: Path, plan: Plan) -> Path:
    """Synthetic VinDr-CXR DICOMs (half with findings) prepared into image shards, as a user prepares theirs."""
    from litegpt.data.policy import PolicyConfig
    from litegpt.data.prepare import PrepareConfig, prepare
    from litegpt.data.synth import synthesize

    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        root = synthesize(out / "vindr", plan.images, plan.test_images, seed=0, max_side_px=1024, progress=False)
        prepare(PrepareConfig(root=root, out=shards, samples_per_shard=32, workers=min(8, os.cpu_count() or 1),
                              policy=PolicyConfig("union")))
    return shards


def overrides(model_yaml: Path, shards: Path, run_dir: Path, micro: int, plan: Plan) -> list[str]:
    """configs/stage1.yaml (the paper's recipe) pointed at the check's model and data, for a short timed run."""
    total = plan.warmup + plan.steps
    values = {"model": model_yaml, "run.dir": run_dir, "data.shards": shards, "data.num_workers": 2,
              "train.micro_batch": micro, "train.precision": "bf16", "train.max_steps": total,
              "log.every": plan.warmup if plan.steps % plan.warmup == 0 else 1, "checkpoint.save_every": total,
              "optim.lr": 1e-4, "optim.min_lr": 1e-4, "optim.warmup_lr": 1e-4, "optim.warmup_steps": 0}
    return [f"{key}={value}" for key, value in values.items()]


def train(model_yaml: Path, shards: Path, run_dir: Path, micro: int, plan: Plan) -> dict:
    """`train.py` stage 1 as a user runs it on one device; figures from its own metrics.jsonl."""
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/stage1.yaml"),
               "--deepspeed", str(ROOT / "ds_configs/zero2.json"), "--resume", "none"]
    for item in overrides(model_yaml, shards, run_dir, micro, plan):
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train.py at micro-batch {micro} exited {done.returncode}:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in rows if "samples_per_s" in r][-1]  # the window after the warm-up
    return {"name": "train.py ZeRO-2", "micro_batch": micro, "wall_s": time.perf_counter() - start,
            **{k: perf.get(k) for k in ("samples_per_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_gib",
                                        "peak_rss_gib", "data_share")}, **loss_checks([r["loss"] for r in rows])}


def authors(model_yaml: Path, shards: Path, work: Path, plan: Plan) -> dict:
    """The authors' training configuration on the same model and data: fp16 autocast with loss scaling, eager
    attention, batch `plan.authors_batch`, a plain PyTorch loop (benchmarks/train_step.py's bare loop)."""
    from train_step import bare_loop, stream_batches

    from litegpt.train.config import load_recipe
    from litegpt.train.monitor import device_peak_tflops

    data = yaml.safe_load(model_yaml.read_text())
    data["llm"].update(dtype="float16", attn_implementation="eager")
    authors_yaml = model_yaml.with_name("model_authors.yaml")
    authors_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(ROOT / "configs/stage1.yaml", overrides(authors_yaml, shards, work / "run-authors",
                                                                 plan.authors_batch, plan),
                         ROOT / "ds_configs/zero2.json", 1)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row, losses = bare_loop(recipe, stream_batches(recipe), plan.warmup, fp16_autocast=True)
    peak = device_peak_tflops(None)
    return {"name": "authors: fp16 autocast, eager", "micro_batch": plan.authors_batch,
            "samples_per_s": row["samples_per_s"], "tokens_per_s": row["tokens_per_s"],
            "tflops_per_device": row["tflops"], "mfu": row["tflops"] / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "data_share": None, **loss_checks(losses)}


def loss_checks(losses: list[float]) -> dict:
    """The losses, whether all are finite, and whether the last third's mean is below the first third's."""
    third = max(1, len(losses) // 3)
    return {"losses": losses, "loss_finite": all(map(math.isfinite, losses)),
            "loss_falls": sum(losses[-third:]) / third < sum(losses[:third]) / third}


def generation(model_yaml: Path, export_stage: Path, shards: Path, plan: Plan) -> dict:
    """Samples/s of greedy generation with the trained export at each batch size (EOS suppressed: equal work)."""
    from litegpt.eval.inference import load_model, load_stage
    from litegpt.features import open_cache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage = load_stage(export_stage)
    model = load_model(stage, with_encoders=False, device=device)
    cache = open_cache(shards, load_model_config(model_yaml).vision)
    features = [f for _, _, f in cache.samples("train")][: 2 * max(plan.generation)]
    prompt = stage.grammar.prompt("identify")
    seconds(model, features[: plan.generation[-1]], prompt, plan.generation[-1], 2, device)  # warm-up
    return {f"batch_{b}_samples_per_s": len(features) / seconds(model, features, prompt, b, plan.new_tokens, device)
            for b in plan.generation}


def markdown(report: dict) -> str:
    """The report as the tables docs/BENCHMARKS.md records (whatever phases have finished)."""
    env = report["environment"]
    lines = [f"# GPU check: {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, transformers "
             f"{env['transformers']}, peft {env['peft']}; {report['layers']} decoder layers; attention "
             f"{env['attention']}, SDPA kernel {env['sdpa_kernel']}", ""]
    if "cache_images_per_s" in report:
        lines += [f"Feature cache, full-size encoders ({report['vision_dtype']}): "
                  f"{report['cache_images_per_s']:.1f} images/s.", ""]
    lines += ["| run | micro-batch | samples/s | tokens/s | TFLOP/s | MFU | peak GiB | data share | loss finite, falls |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in report.get("train", []):
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        peak = row.get("peak_gib") or row.get("peak_rss_gib")
        share = "-" if row["data_share"] is None else f"{row['data_share']:.1%}"
        lines.append(f"| {row['name']} | {row['micro_batch']} | {row['samples_per_s']:.2f} | "
                     f"{row['tokens_per_s']:.0f} | {row['tflops_per_device']:.2f} | {mfu} | "
                     f"{'-' if peak is None else f'{peak:.1f}'} | {share} | {row['loss_finite']}, {row['loss_falls']} |")
    if "generation" in report:
        lines += ["", "| generation batch | samples/s |", "|---|---|"]
        lines += [f"| {k.split('_')[1]} | {v:.2f} |" for k, v in report["generation"].items()]
    lines += [f"- failed: {name}: {error}" for name, error in report.get("failed", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="report: gpu_check.json, gpu_check.md")
    parser.add_argument("--work", type=Path, default=None, help="weights, data and runs (default: OUT/work)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU at 1 layer, tiny sizes")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a saved Llama-2 tokenizer (gpu_wheels.sh writes .whl/llama2-tokenizer); default: build it")
    args = parser.parse_args()
    plan = Plan.of(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    report: dict = {"layers": plan.layers, "environment": environment(), "train": [], "failed": {}}

    def phase(name: str, run) -> object:
        """Run one measurement; a failure is recorded and the check goes on, and the report is rewritten after
        every phase, so a run cut short by its time limit still leaves what it measured."""
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 (an unattended one-shot run reports every failure and goes on)
            report["failed"][name] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
            result = None
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_check.md").write_text(markdown(report))
        print(f"{name}: {'failed' if name in report['failed'] else 'done'}", flush=True)
        return result

    model_yaml = model_config(work / "model", plan.layers, args.tokenizer or _carried_tokenizer())
    vision = load_model_config(model_yaml).vision
    shards = dataset(work, plan)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report["vision_dtype"] = vision.dtype
    report["cache_images_per_s"] = cache_throughput(vision, shards, batch_size=32, workers=4, device=device)
    for micro in plan.micro_batches:
        phase(f"train.py micro-batch {micro}", lambda: report["train"].append(
            train(model_yaml, shards, work / f"run-mb{micro}", micro, plan)))
    phase("authors' configuration", lambda: report["train"].append(authors(model_yaml, shards, work, plan)))
    done = [r["micro_batch"] for r in report["train"] if r["name"].startswith("train.py")]
    phase("generation", lambda: report.update(generation=generation(
        model_yaml, work / f"run-mb{done[-1]}" / "stage1", shards, plan)))
    print(markdown(report))
    return 1 if report["failed"] else 0


def _carried_tokenizer() -> Path | None:
    carried = ROOT / ".whl" / "llama2-tokenizer"
    return carried if carried.is_dir() else None


if __name__ == "__main__":
    sys.exit(main())
