"""`benchmarks/gpu_check.py --dry-run`: the GPU check's own code, on CPU at one decoder layer of the paper's
width, so that the one command prepared for a GPU machine is known to run before a GPU is ever seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--out", str(tmp_path), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == {}
    model = yaml.safe_load((tmp_path / "work/model/model.yaml").read_text())
    arch = model["llm"]["arch"]
    # the paper's shape, only the depth reduced
    assert (arch["hidden_size"], arch["vocab_size"], arch["num_hidden_layers"]) == (4096, 32000, 1) == (
        4096, 32000, report["layers"])
    assert model["projector"]["hidden"] == 5632 and model["lora"]["r"] == 64
    assert report["environment"]["attention"] == "sdpa"  # no CUDA here
    assert "scaled_dot_product" in report["environment"]["sdpa_kernel"]
    assert report["cache_images_per_s"] > 0
    rows = [r for r in report["train"] if r["name"] == "train.py ZeRO-2"]
    assert [r["micro_batch"] for r in rows] == [1, 2]
    authors = [r for r in report["train"] if r["name"].startswith("authors")]
    assert len(authors) == 1 and authors[0]["loss_finite"] and len(authors[0]["losses"]) == 3
    for row in rows:
        metrics = [json.loads(line) for line in
                   (tmp_path / f"work/run-mb{row['micro_batch']}/stage1/metrics.jsonl").read_text().splitlines()]
        assert row["losses"] == [m["loss"] for m in metrics] and len(metrics) == 3  # warm-up 1 + 2 timed steps
        assert row["loss_finite"] and row["samples_per_s"] > 0 and row["mfu"] is None  # no known peak on CPU
        # tokens per sample: at least the 49 image embeddings and the prompt, at most the model's max_length
        assert 49 < row["tokens_per_s"] / row["samples_per_s"] <= model["llm"]["max_length"]
    assert set(report["generation"]) == {"batch_1_samples_per_s", "batch_2_samples_per_s"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| train.py ZeRO-2 |") == 2 and "| authors" in table
