"""Generation throughput: batched (left-padded, as `litegpt evaluate` runs it) vs one sample at a time.

Every sample generates exactly `--new-tokens` tokens (EOS suppressed), so both sides do the same work
and the numbers measure decoding, not when a random model happens to stop. Input is cached features
(what evaluate streams when the shards have a cache), computed once from random images.

    python benchmarks/generate.py [--preset configs/model_tiny.yaml] [--images 16] [--batch-size 8]
                                  [--new-tokens 128] [--task identify] [--threads N]

Parts of the preset whose `source` is a local path are written with random weights (the tiny preset's
`litegpt tiny-weights` formats) into a temporary directory; hub-id sources are loaded as configured, so
`--preset configs/model_paper.yaml` measures the paper model on a GPU with the public weights in the
Hugging Face cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR
from litegpt.model.config import ModelConfig, Visual, load_model_config, local_source
from litegpt.model.model import build_model
from litegpt.model.tiny import build_weights

ROOT = Path(__file__).resolve().parent.parent


def with_random_local_weights(cfg: ModelConfig, directory: Path) -> ModelConfig:
    """The config with its local-path parts redirected into `directory` and written there with random weights."""
    encoders = tuple(dataclasses.replace(e, source=str(directory / e.name)) if local_source(e.source) else e
                     for e in cfg.vision.encoders)
    llm = dataclasses.replace(cfg.llm, source=str(directory / "llm")) if local_source(cfg.llm.source) else cfg.llm
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, encoders=encoders), llm=llm)
    build_weights(cfg)
    return cfg


def sample_features(model, n: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Encoder features of `n` random grayscale images, one dict per image (as the feature cache yields them)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        image = Image.fromarray(rng.integers(0, 256, (832, 1024), dtype=np.uint8), "L")
        pixels = {k: v.unsqueeze(0).to(device) for k, v in model.vision.preprocess(image).items()}
        with torch.inference_mode():
            out.append({k: v[0].cpu() for k, v in model.vision(pixels).items()})
    return out


def seconds(model, features: list[dict[str, torch.Tensor]], prompt: str, batch_size: int, new_tokens: int,
            device: torch.device) -> float:
    """Wall time to generate for every sample in batches of `batch_size`."""
    start = time.perf_counter()
    for first in range(0, len(features), batch_size):
        chunk = features[first:first + batch_size]
        keys = [str(first + i) for i in range(len(chunk))]
        batch = model.inputs.generation_batch(keys, [prompt] * len(chunk), chunk, Visual.CACHE).to(device)
        model.generate(batch, new_tokens, min_new_tokens=new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "model_tiny.yaml", help="model config")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sample")
    parser.add_argument("--task", choices=("identify", "vqa"), default="identify", help="whose prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = with_random_local_weights(load_model_config(args.preset), Path(tmp))
        model = build_model(cfg).to(device).eval()
        features = sample_features(model, args.images, device)
        prompt = Grammar(VINDR_CXR).prompt(args.task)  # the paper's prompt (its dataset's labels)
        seconds(model, features[: args.batch_size], prompt, args.batch_size, 4, device)  # warm-up
        sizes = (1, args.batch_size)
        timings = {b: seconds(model, features, prompt, b, args.new_tokens, device) for b in sizes}
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"{name}; torch {torch.__version__}; preset {args.preset.name} (llm {cfg.llm.dtype}); {args.images} "
          f"samples, `{args.task}` prompt, {args.new_tokens} new tokens each (EOS suppressed), cached features")
    print()
    print("| batch size | samples/s | new tokens/s | s/sample | speed-up |")
    print("|---|---|---|---|---|")
    for b in sizes:
        rate = args.images / timings[b]
        print(f"| {b} | {rate:.2f} | {rate * args.new_tokens:.0f} | {timings[b] / args.images:.3f} | "
              f"{timings[1] / timings[b]:.2f}x |")


if __name__ == "__main__":
    main()
