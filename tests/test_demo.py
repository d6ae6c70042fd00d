"""The demo that learns, and the prior baseline it is measured against.

The baseline is checked by hand on a small case and against the counts `prepare` wrote in the manifest;
the slow test runs `litegpt demo` end to end (deepspeed on 2 CPU ranks) and asserts that the trained
tiny model beats the baseline clearly on the test split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from litegpt.data.shards import read_manifest
from litegpt.eval.baseline import fit_prior, prior_predictions, split_json
from litegpt.eval.metrics import compute_metrics
from litegpt.grammar import Grammar, quantize_box
from litegpt.labels import VINDR_CXR

REPO = Path(__file__).resolve().parent.parent


def image(i: int, findings: list[tuple[str, list[float]]], diagnoses: list[str]) -> dict:
    return {"image_id": f"im{i}", "findings": [{"label": label, "box": box} for label, box in findings],
            "diagnoses": diagnoses}


def test_prior_by_hand():
    a1, a2, a3, b = [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.5, 0.6], [0.2, 0.2, 0.4, 0.5], [0.5, 0.5, 0.7, 0.7]
    train = [
        image(0, [("Cardiomegaly", a1), ("ILD", b)], ["Pneumonia"]),
        image(1, [("Cardiomegaly", a2), ("Cardiomegaly", a3)], []),
        image(2, [("ILD", b)], ["Pneumonia"]),
        image(3, [("Cardiomegaly", a1), ("Nodule/Mass", b)], ["Lung tumor"]),
        image(4, [], ["No finding"]),
    ]
    prior = fit_prior(train)
    # Cardiomegaly is in 3 of the 4 images with findings (its boxes: a1, a2, a3, a1); ILD in exactly half: out.
    assert [label for label, _ in prior.findings] == ["Cardiomegaly"]
    assert prior.findings[0][1] == pytest.approx([0.175, 0.2, 0.375, 0.475])
    # Pneumonia is in 2 of 5 images and no label is in more than half: the most frequent one alone.
    assert prior.diagnoses == ("Pneumonia",)
    vindr = Grammar(VINDR_CXR)
    assert vindr.parse(prior.answer("identify", vindr)).findings == [("Cardiomegaly", (18, 20, 38, 48))]
    assert vindr.parse(prior.answer("vqa", vindr)).labels == ["Pneumonia"]

    no_finding_majority = fit_prior([*train, *(image(5 + i, [], ["No finding"]) for i in range(4))])
    assert no_finding_majority.diagnoses == ("No finding",)  # 5 of 9
    with pytest.raises(ValueError, match="no image with findings"):
        fit_prior([train[4]])


def test_prior_matches_the_manifest_counts(prepared):
    """Label frequencies from prepare's manifest (an independent count), boxes from the sample json."""
    manifest = read_manifest(prepared)
    stats, vocabulary = manifest["splits"]["train"], Grammar.from_record(manifest).vocabulary
    train = list(split_json(prepared, "train"))
    n_findings = stats["images_with_findings"]
    local = {k: v for k, v in stats["images"].items() if k in vocabulary.local_labels}
    expected = sorted(k for k, v in local.items() if 2 * v > n_findings) or [max(local, key=local.get)]
    prior = fit_prior(train)
    assert sorted(label for label, _ in prior.findings) == expected
    for label, box in prior.findings:
        boxes = [f["box"] for s in train for f in s["findings"] if f["label"] == label]
        assert len(boxes) == stats["boxes"][label]
        assert box == pytest.approx(np.mean(boxes, axis=0).tolist())
    diagnoses = {k: v for k, v in stats["images"].items() if k in vocabulary.global_labels}
    expected = (sorted(k for k, v in diagnoses.items() if 2 * v > stats["samples"])
                or [max(diagnoses, key=diagnoses.get)])
    assert sorted(prior.diagnoses) == expected


def test_baseline_scores_like_a_model(prepared):
    """The records go through compute_metrics; local micro-F1 recomputed by hand from the test json."""
    prior, grammar = fit_prior(split_json(prepared, "train")), Grammar.from_record(read_manifest(prepared))
    test = list(split_json(prepared, "test"))
    records = prior_predictions(prior, test, grammar)
    assert len(records) == 2 * len(test) and {r.task for r in records} == {"identify", "vqa"}
    metrics = compute_metrics(records, grammar)
    said = {label for label, _ in prior.findings}
    truth = [{f["label"] for f in s["findings"]} for s in test]
    tp = sum(len(said & t) for t in truth)
    f1 = 2 * tp / (len(said) * len(test) + sum(map(len, truth)))
    assert metrics["strict"]["classification"]["local"]["micro avg"]["f1-score"] == pytest.approx(f1)
    boxes = {label: quantize_box(box) for label, box in prior.findings}
    assert metrics["strict"]["localisation"]["pred_boxes"] == len(boxes) * len(test)
    assert metrics["parse"]["all"]["rate"] == 1.0


def test_demo_refuses_to_resume_on_other_data(tmp_path):
    """A checkpoint does not know its data: resuming runs made from other dataset flags is refused up front."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/demo.json").write_text(json.dumps({"train": 6000, "test": 300, "seed": 0}))
    done = subprocess.run([sys.executable, "-m", "litegpt.cli", "demo", "--out", str(tmp_path), "--seed", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "trained on another dataset" in done.stderr and "--fresh" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing was synthesised


# The slow test runs the demo as `make demo` does (its default 6,000 + 300 images) on data seed 0.
# Margins over the prior baseline (absolute, 0..1) sit under the smallest margin measured over data seeds and
# CPUs, and over perturbed initial weights (`run.perturb_init`, standing in for another CPU's rounding;
# docs/BENCHMARKS.md, "The demo"). Measured, in points, with the current recipes (2% held out for validation):
# local F1 +11.5 to +17.4, box F1@0.5 +4.5 to +12.4, global F1 +15.7 to +23.1 (seeds 0-2 on one CPU); before the
# hold-out: local +13.7 to +18.9, box +8.8 to +13.5 (seeds 0-2, two CPUs), global +27.4 to +29.0 (seed 0, three
# runs, two perturbed; the former 5-epoch stage 2 gave +7.0 to +24.6). Parse rates: 99-100% in every run.
# Box F1 (seed 2: +4.5) is the tightest; its margin is half of that.
DEMO_SEED = 0
LOCAL_F1_MARGIN, BOX_F1_MARGIN, GLOBAL_F1_MARGIN = 0.05, 0.02, 0.05


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """`litegpt demo` end to end (deepspeed, 2 CPU ranks): the tiny model beats the training prior."""
    from litegpt.eval.report import scalars

    cmd = [sys.executable, "-m", "litegpt.cli", "demo", "--out", str(tmp_path), "--seed", str(DEMO_SEED)]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    runs = tmp_path / "runs"
    model = {stage: scalars(json.loads((runs / stage / "eval/metrics.json").read_text()))
             for stage in ("stage1", "stage2")}
    prior = scalars(json.loads((runs / "baseline/metrics.json").read_text()))
    assert model["stage1"]["strict/local/micro_avg_f1"] >= prior["strict/local/micro_avg_f1"] + LOCAL_F1_MARGIN
    assert model["stage1"]["strict/box_f1@0.5"] >= prior["strict/box_f1@0.5"] + BOX_F1_MARGIN
    assert model["stage2"]["strict/global/micro_avg_f1"] >= prior["strict/global/micro_avg_f1"] + GLOBAL_F1_MARGIN
    assert model["stage1"]["parse/identify_rate"] >= 0.9 and model["stage2"]["parse/vqa_rate"] >= 0.9
    assert (runs / "stage1/eval/report.md").is_file() and (runs / "stage2/eval/report.md").is_file()
    assert list((runs / "stage1/eval/overlays").glob("*.png"))  # boxes come from [identify]
    assert list((tmp_path / "inspect").glob("*.png"))  # training samples drawn with their boxes
    assert all(list((runs / stage / "tensorboard").glob("events.out.tfevents.*")) for stage in ("stage1", "stage2"))
    assert "tensorboard --logdir" in done.stdout and "local labels micro-F1, strict" in done.stdout
