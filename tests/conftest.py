"""Shared fixtures. Heavy artefacts (the synthetic dataset, its shards) are built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """One small synthetic PhysioNet-layout dataset for the whole session (small images keep it fast)."""
    from litegpt.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("vindr") / "root", 40, 12, seed=7, max_side_px=640, progress=False)


@pytest.fixture(scope="session")
def prepared(synth_root, tmp_path_factory) -> Path:
    """Shards of `synth_root`, built once with one worker and small shards (several per split)."""
    from litegpt.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("shards") / "synth"
    prepare(PrepareConfig(root=synth_root, out=out, samples_per_shard=8, workers=1))
    return out


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """configs/model_tiny.yaml with its weights written (real on-disk formats) to a session directory."""
    import dataclasses

    from litegpt.model.config import load_model_config
    from litegpt.model.tiny import build_weights

    root = tmp_path_factory.mktemp("tiny-weights")
    cfg = load_model_config(Path(__file__).parent.parent / "configs" / "model_tiny.yaml")
    encoders = tuple(dataclasses.replace(e, source=str(root / e.name)) for e in cfg.vision.encoders)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, encoders=encoders),
                              llm=dataclasses.replace(cfg.llm, source=str(root / "llm")))
    build_weights(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """The tiny model with encoders, in eval mode (LoRA dropout off). Tests must not change its weights."""
    from litegpt.model.model import build_model

    return build_model(tiny_config).eval()


def write_tiny_shards(directory: Path, sizes: dict[str, list[int]], seed: int = 0) -> Path:
    """A shard set in the `litegpt prepare` format: {split: [samples per shard]}; random grayscale PNGs."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from litegpt.data.shards import MANIFEST, Sample, shard_name, write_shard
    from litegpt.files import write_json_atomic

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards, splits = [], {}
    for split, counts in sizes.items():
        for index, count in enumerate(counts):
            samples = []
            for i in range(count):
                key = f"{split}{index}{i:04d}" + "ab" * 4
                h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(buffer, format="PNG")
                meta = {"image_id": key, "split": split, "source": {"rows": h * 10, "cols": w * 10},
                        "findings": [{"label": "Cardiomegaly", "box": [0.3, 0.5, 0.7, 0.8]}] if i % 2 else [],
                        "diagnoses": ["COPD"] if i % 2 else ["No finding"], "n_raters": 3}
                samples.append(Sample(key, {"png": buffer.getvalue(), "json": json.dumps(meta).encode()}))
            count, digest = write_shard(directory / shard_name(split, index), samples)
            shards.append({"name": shard_name(split, index), "split": split, "samples": count, "sha256": digest})
            splits.setdefault(split, {"samples": 0})["samples"] += count
    write_json_atomic(directory / MANIFEST, {"format": "litegpt-shards/1", "shards": shards, "splits": splits})
    return directory


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Three small image shards (train 3 + 2 samples, test 2) written by the shard writer."""
    return write_tiny_shards(tmp_path_factory.mktemp("tiny-shards") / "set", {"train": [3, 2], "test": [2]})


@pytest.fixture
def make_shards():
    """The writer behind `tiny_shards`, for tests that need their own (e.g. to change or break them)."""
    return write_tiny_shards


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as each training rank runs on CPU: the numerics then match across processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
