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
    from litegpt.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("vindr") / "root", 40, 12, seed=7, max_side_px=640, progress=False)


@pytest.fixture(scope="session")
def prepared(synth_root, tmp_path_factory) -> Path:
    """Shards of `synth_root`, built once with one worker and small shards (several per split)."""
    from litegpt.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("shards") / "synth"
    prepare(PrepareConfig(root=synth_root, out=out, samples_per_shard=8, workers=1))
    return out
