"""Feature cache vs live encoders, side by side in one run (CPU by default).

1. Cache build throughput (images/s, PNG decode + preprocessing + encoders + fp16 npy + tar writing) for
   the tiny preset's encoders and for the paper's full-size encoder shapes (BiomedCLIP ViT-B/16 +
   PubMedCLIP ViT-B/32, random weights).
2. One training step (forward, backward, AdamW) of a model with the full-size encoder shapes and the tiny
   LLM, fed cached features vs pixels through the live encoders. With the cache the vision cost per step
   is only the projector's.

    python benchmarks/features.py [--images 32] [--batch-size 8] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from litegpt.data.shards import MANIFEST, Sample, iter_tar, read_manifest, shard_name, write_shard
from litegpt.features import build_cache, open_cache
from litegpt.files import write_json_atomic
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR
from litegpt.model.config import Visual, load_model_config
from litegpt.model.encoders import VisualBackbone
from litegpt.model.inputs import TrainSample
from litegpt.model.model import build_model
from litegpt.model.tiny import build_weights

ROOT = Path(__file__).resolve().parent.parent


def write_shards(directory: Path, n: int, per_shard: int = 16, seed: int = 0) -> Path:
    """Smooth 8-bit grayscale images at the shards' usual size (longer side 1024) in the shard format."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    shards, keys = [], iter(range(n))
    for index in range((n + per_shard - 1) // per_shard):
        samples = []
        for i in [k for _, k in zip(range(per_shard), keys)]:
            noise = Image.fromarray(rng.integers(0, 256, (832, 1024), dtype=np.uint8), "L")
            image = noise.filter(ImageFilter.GaussianBlur(6))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            meta = {"image_id": f"img{i:05d}", "split": "train", "findings": [], "diagnoses": [VINDR_CXR.no_finding]}
            samples.append(Sample(f"img{i:05d}", {"png": buffer.getvalue(), "json": json.dumps(meta).encode()}))
        count, digest = write_shard(directory / shard_name("train", index), samples)
        shards.append({"name": shard_name("train", index), "split": "train", "samples": count, "sha256": digest})
    write_json_atomic(directory / MANIFEST, {"shards": shards, "splits": {"train": {"samples": n}}})
    return directory


def configs(workdir: Path):
    """(tiny config with weights on disk, same with the paper's encoders as random full-size float32)."""
    tiny = load_model_config(ROOT / "configs" / "model_tiny.yaml")
    encoders = tuple(dataclasses.replace(e, source=str(workdir / e.name)) for e in tiny.vision.encoders)
    tiny = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, encoders=encoders),
                               llm=dataclasses.replace(tiny.llm, source=str(workdir / "llm")))
    build_weights(tiny)
    paper = load_model_config(ROOT / "configs" / "model_paper.yaml")
    full_vision = dataclasses.replace(paper.vision, dtype="float32",
                                      encoders=tuple(dataclasses.replace(e, source=None) for e in paper.vision.encoders))
    return tiny, dataclasses.replace(tiny, vision=full_vision)


def cache_throughput(vision, shards: Path, batch_size: int, workers: int, device: str = "cpu") -> float:
    """Images/s of building the cache of `shards` (which it writes), the encoders' loading and warm-up excluded."""
    backbone = VisualBackbone(vision).to(device)
    with torch.inference_mode():  # warm-up, outside the timing
        backbone({e.name: torch.zeros(batch_size, 3, e.image_size, e.image_size, device=device, dtype=backbone.dtype)
                  for e in vision.encoders})
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    build_cache(shards, vision, backbone=backbone, batch_size=batch_size, device=device, workers=workers,
                progress=False)
    elapsed = time.perf_counter() - start
    return sum(1 for _ in open_cache(shards, vision).samples("train")) / elapsed


def step_times(cfg, shards: Path, batch_size: int, steps: int) -> dict[str, float]:
    """Median seconds per training step fed cached features vs live encoders (same samples)."""
    model = build_model(cfg)
    model.train()
    cache = open_cache(shards, cfg.vision)
    grammar = Grammar.from_record(read_manifest(shards))  # VinDr-CXR's: the manifest records no other
    prompt = grammar.prompt("vqa")
    pngs = {}
    for path in sorted(shards.glob("train-*.tar")):
        pngs.update({s.key: s.members["png"] for s in iter_tar(path, extensions={"png"})})
    cached, live = [], []
    for key, meta, features in cache.samples("train"):
        answer = grammar.answer("vqa", meta)
        pixels = model.vision.preprocess(Image.open(io.BytesIO(pngs[key])))
        cached.append(TrainSample(key, prompt, answer, features, Visual.CACHE))
        live.append(TrainSample(key, prompt, answer, pixels, Visual.LIVE))
        if len(cached) == batch_size:
            break
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    results = {}
    for name, samples in (("cached", cached), ("live", live)):
        batch = model.inputs.train_batch(samples)
        times = []
        for _ in range(steps + 1):  # first step warms up
            start = time.perf_counter()
            optimizer.zero_grad()
            model(batch).loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        results[name] = float(np.median(times[1:]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="PNG decode threads")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny, full = configs(tmp / "weights")
        shards_tiny = write_shards(tmp / "shards-tiny", args.images)
        shards_full = write_shards(tmp / "shards-full", args.images)
        rate_tiny = cache_throughput(tiny.vision, shards_tiny, args.batch_size, args.workers)
        rate_full = cache_throughput(full.vision, shards_full, args.batch_size, args.workers)
        steps = step_times(full, shards_full, args.batch_size, args.steps)
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; {args.images} images 1024x832 PNG, batch {args.batch_size}")
    print()
    print("| measurement | tiny encoders | full-size encoders (ViT-B/16 + ViT-B/32, random) |")
    print("|---|---|---|")
    print(f"| feature-cache build, images/s | {rate_tiny:.1f} | {rate_full:.1f} |")
    print()
    print(f"| training step (full-size encoder shapes, tiny LLM, batch {args.batch_size}) | s/step |")
    print("|---|---|")
    print(f"| cached features | {steps['cached']:.3f} |")
    print(f"| live encoders | {steps['live']:.3f} |")
    print(f"| difference = vision cost per step that the cache removes | {steps['live'] - steps['cached']:.3f} |")


if __name__ == "__main__":
    main()
