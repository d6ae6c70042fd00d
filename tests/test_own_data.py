"""A dataset that is not VinDr-CXR, end to end through the README's commands, in each reader's format.

`litegpt synth --format csv|coco` writes data nobody hand-wrote with a vocabulary of other size and names
(csv: 8 local + 3 global labels, raters that disagree, PNG/JPEG/DICOM images; coco: 5 categories, no
global labels). The VinDr family's own-label-list case is a synthetic Kaggle-layout `train.csv` whose 14
classes are relabelled into 5 groups, given on the command line. Each goes through `litegpt prepare` ->
`litegpt cache-features` -> `train.py` (tiny stage 1) -> `litegpt evaluate`, and every step is checked
against the vocabulary synth wrote (`labels.yaml`, or the command line's) and the text an independent
`Grammar` renders from the shard JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from litegpt.cli import main
from litegpt.data.shards import iter_json, read_manifest
from litegpt.grammar import Grammar, TaskTemplate
from litegpt.labels import KAGGLE_CLASSES, VINDR_CXR, Vocabulary

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
TEMPLATE = {"local_prefix": "Findings of this radiograph are", "no_findings_prefix": "This radiograph shows",
            "no_findings": "nothing abnormal"}
GROUPS = ("Cardiac", "Mediastinal", "Parenchymal", "Pleural", "Nodular")  # the relabelled VinDr family's labels


def relabel_kaggle(root: Path) -> Vocabulary:
    """Rewrite a synthetic Kaggle-layout train.csv with the 14 finding classes merged into GROUPS (class_id
    kept: only VinDr-CXR's own labels are checked against it); returns the vocabulary to prepare it with."""
    frame = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    groups = {name: GROUPS[i % len(GROUPS)] for i, name in enumerate(KAGGLE_CLASSES) if name != VINDR_CXR.no_finding}
    frame["class_name"] = frame["class_name"].map(lambda name: groups.get(name, name))
    frame.to_csv(root / "train.csv", index=False)
    return Vocabulary.build(root.name, GROUPS)


@pytest.fixture(scope="module", params=["csv", "coco", "vindr"])
def trained(request, tiny_config, tmp_path_factory) -> dict:
    """One dataset of the format, prepared, cached, trained (tiny stage 1, one rank) and evaluated."""
    fmt = request.param
    work = tmp_path_factory.mktemp(f"own-{fmt}")
    root, shards, template = work / "root", work / "shards", work / "template.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    layout = ["--layout", "kaggle"] if fmt == "vindr" else []
    assert main(["synth", "--out", str(root), "--format", fmt, *layout, "--train", "48", "--test", "12",
                 "--seed", "3", "--max-side-px", "320", "--workers", "1"]) == 0
    # csv: the vocabulary is inferred from the rows; coco: given as a file; vindr: on the command line.
    if fmt == "vindr":
        vocabulary = relabel_kaggle(root)
        labels = [*layout, "--holdout", "0.25", "--local-labels", ",".join(vocabulary.local_labels)]
    else:
        vocabulary = Vocabulary.from_yaml(root / "labels.yaml")
        labels = ["--labels", str(root / "labels.yaml")] if fmt == "coco" else []
    assert main(["prepare", "--format", fmt, "--root", str(root), "--out", str(shards), "--samples-per-shard", "8",
                 "--workers", "1", "--template", str(template), *labels]) == 0
    model = work / "model_tiny.yaml"
    model.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_config.to_dict()))))
    assert main(["cache-features", "--shards", str(shards), "--model", str(model)]) == 0
    recipe = yaml.safe_load((REPO / "configs/tiny/stage1.yaml").read_text())
    recipe.update(model=str(model), eval={"fraction": 0.0})
    recipe["run"]["dir"] = str(work / "runs")
    recipe["data"]["shards"] = str(shards)
    recipe["train"].update(micro_batch=4, epochs=4)
    recipe["checkpoint"]["save_every"] = 1000
    recipe["log"]["every"] = 1
    (work / "stage1.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, str(REPO / "train.py"), "--config", str(work / "stage1.yaml"),
               "--deepspeed", str(REPO / "ds_configs/zero2.json")]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"train.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    stage = work / "runs/stage1"
    assert main(["evaluate", "--run", str(stage), "--shards", str(shards)]) == 0
    images = 48 if fmt == "vindr" else 48 + 12  # the Kaggle layout has train images only
    return {"format": fmt, "shards": shards, "stage": stage, "images": images,
            "grammar": Grammar(vocabulary, TaskTemplate(**TEMPLATE))}


def test_prepare_records_the_datasets_own_vocabulary_and_loses_no_image(trained):
    manifest = read_manifest(trained["shards"])
    grammar = trained["grammar"]
    vocabulary = grammar.vocabulary
    assert Grammar.from_record(manifest).to_dict() == grammar.to_dict()
    assert vocabulary != VINDR_CXR and len(vocabulary.local_labels) != len(VINDR_CXR.local_labels)
    assert not set(vocabulary.local_labels) <= set(VINDR_CXR.all_labels)
    if trained["format"] != "csv":
        assert vocabulary.global_labels == (vocabulary.no_finding,)  # detection only
    else:
        assert vocabulary.diseases
    metas = [m for s in manifest["shards"] for m in iter_json(trained["shards"] / s["name"])]
    assert len(metas) + len(manifest["dropped"]) == trained["images"]
    found = {f["label"] for m in metas for f in m["findings"]}
    assert found == set(vocabulary.local_labels)  # synth's pool cycles through every label
    assert {d for m in metas for d in m["diagnoses"]} <= set(vocabulary.global_labels)
    assert all(0 <= v <= 1 for m in metas for f in m["findings"] for v in f["box"])


def test_the_stage_trains_and_its_export_carries_the_vocabulary(trained):
    rows = [json.loads(line) for line in (trained["stage"] / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(steps) >= 8 and all(math.isfinite(v) for v in steps.values())
    assert steps[max(steps)] < steps[min(steps)]  # it learns something
    info = json.loads((trained["stage"] / "export/export.json").read_text())
    assert Grammar.from_record(info).to_dict() == trained["grammar"].to_dict()


def test_evaluate_renders_the_datasets_text_and_scores_its_labels(trained):
    grammar = trained["grammar"]
    manifest = read_manifest(trained["shards"])
    truth = {m["image_id"]: m for s in manifest["shards"] if s["split"] == "test"
             for m in iter_json(trained["shards"] / s["name"])}
    eval_dir = trained["stage"] / "eval"
    records = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in records) == sorted(truth)
    for r in records:
        assert r["target"] == grammar.answer(r["task"], truth[r["image_id"]])
    assert any(r["target"].startswith("Findings of this radiograph are") for r in records)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    local = metrics["strict"]["classification"]["local"]  # scikit-learn's report: labels, then averages
    labels = grammar.vocabulary.local_labels
    assert list(local)[:len(labels)] == list(labels) and "micro avg" in local
    assert sum(local[name]["support"] for name in labels) == sum(
        len({f["label"] for f in m["findings"]}) for m in truth.values())
