"""`litegpt synth`: the synthetic root must look like VinDr-CXR (or a generic box CSV / COCO set) to any
reader, and be reproducible.

Checks read the output the way an outside tool would (csv/pandas, json, Pillow, pydicom with two different
decoders, pydicom's own modality/VOI LUT functions) rather than through the generator's internals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import JPEG2000Lossless, RLELossless

from litegpt import cli
from litegpt.data.synth import CSV_COLUMNS, ENCODINGS, PHI_MARKER, SENTINEL, plan_dataset, render, synthesize
from litegpt.labels import KAGGLE_CLASSES, SYNTH_COCO, SYNTH_CSV, VINDR_CXR, Vocabulary

LOCAL_LABELS, GLOBAL_LABELS, NO_FINDING = VINDR_CXR.local_labels, VINDR_CXR.global_labels, VINDR_CXR.no_finding
N_TRAIN, N_TEST, SIDE = 18, 9, 256
TRAIN_LABELS = [*LOCAL_LABELS, *GLOBAL_LABELS[:4], "Other diseases", NO_FINDING]
TEST_LABELS = [*LOCAL_LABELS, *GLOBAL_LABELS[:4], "Other disease", NO_FINDING]
BOX = ["x_min", "y_min", "x_max", "y_max"]
ANN_COLUMNS = ["image_id", "rad_id", "class_name", *BOX]


def _make(out: Path, **kw) -> Path:
    args = dict(n_train=N_TRAIN, n_test=N_TEST, seed=0, max_side_px=SIDE, workers=1, progress=False)
    return synthesize(out, **{**args, **kw})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth") / "vindr")


@pytest.fixture(scope="module")
def plain_root(tmp_path_factory) -> Path:
    """The same dataset with findings left out of the pixels."""
    return _make(tmp_path_factory.mktemp("synth_plain") / "vindr", draw_findings=False)


def _ann(root: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(root / "annotations" / f"annotations_{split}.csv", dtype={"rad_id": str})


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Displayed image by pydicom's own LUT functions: bright = dense for every photometric."""
    x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    return x.max() - x if ds.PhotometricInterpretation == "MONOCHROME1" else x


def test_physionet_layout_and_csv_spellings(root: Path):
    ann = root / "annotations"
    assert sorted(p.name for p in ann.iterdir()) == [
        "annotations_test.csv", "annotations_train.csv", "image_labels_test.csv", "image_labels_train.csv"]
    assert (root / SENTINEL).is_file()
    train_ids = {p.stem for p in (root / "train").glob("*.dicom")}
    test_ids = {p.stem for p in (root / "test").glob("*.dicom")}
    assert len(train_ids) == N_TRAIN and len(test_ids) == N_TEST and not train_ids & test_ids
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in train_ids | test_ids)

    for split in ("train", "test"):
        assert list(_ann(root, split).columns) == ANN_COLUMNS
    labels_train = pd.read_csv(ann / "image_labels_train.csv")
    labels_test = pd.read_csv(ann / "image_labels_test.csv")
    assert list(labels_train.columns) == ["image_id", "rad_id", *TRAIN_LABELS]
    assert list(labels_test.columns) == ["image_id", *TEST_LABELS]
    assert labels_train.columns[2 + 26] == "Other diseases" and labels_test.columns[1 + 26] == "Other disease"

    assert set(labels_train.image_id) == set(_ann(root, "train").image_id) == train_ids
    assert set(labels_test.image_id) == set(_ann(root, "test").image_id) == test_ids
    assert (labels_train.groupby("image_id").rad_id.nunique() == 3).all()
    assert labels_train.rad_id.str.fullmatch(r"R([1-9]|1[0-7])").all()
    assert labels_test.image_id.is_unique
    assert labels_train[TRAIN_LABELS].isin([0, 1]).all().all()


def test_boxes_are_pixels_inside_the_image_and_no_finding_has_none(root: Path):
    for split in ("train", "test"):
        df = _ann(root, split)
        empty = df[BOX].isna()
        assert (empty.all(axis=1) == (df.class_name == NO_FINDING)).all()
        assert empty.any(axis=1).equals(empty.all(axis=1))
        assert set(df.class_name) <= set(LOCAL_LABELS) | {NO_FINDING}
        for image_id, rows in df.dropna(subset=BOX).groupby("image_id"):
            ds = pydicom.dcmread(root / split / f"{image_id}.dicom", stop_before_pixels=True)
            assert (rows.x_min >= 0).all() and (rows.y_min >= 0).all()
            assert (rows.x_max <= ds.Columns - 1).all() and (rows.y_max <= ds.Rows - 1).all()
            assert (rows.x_max > rows.x_min).all() and (rows.y_max > rows.y_min).all()
    assert _ann(root, "test").rad_id.isna().all()


def test_image_labels_agree_with_each_raters_boxes(root: Path):
    ann = _ann(root, "train")
    labels = pd.read_csv(root / "annotations" / "image_labels_train.csv")
    for row in labels.itertuples(index=False):
        values = dict(zip(labels.columns, row))
        boxed = set(ann[(ann.image_id == values["image_id"]) & (ann.rad_id == values["rad_id"])].class_name)
        assert {lab for lab in LOCAL_LABELS if values[lab]} == boxed - {NO_FINDING}
        assert values[NO_FINDING] == int(boxed == {NO_FINDING})
        if values[NO_FINDING]:
            assert sum(values[lab] for lab in TRAIN_LABELS) == 1
    test_ann = _ann(root, "test")
    test_labels = pd.read_csv(root / "annotations" / "image_labels_test.csv")
    for row in test_labels.itertuples(index=False):
        values = dict(zip(test_labels.columns, row))
        boxed = set(test_ann[test_ann.image_id == values["image_id"]].class_name)
        assert {lab for lab in LOCAL_LABELS if values[lab]} == boxed - {NO_FINDING}
        assert values[NO_FINDING] == int(boxed == {NO_FINDING})


def test_raters_disagree_like_vindr(root: Path):
    ann = _ann(root, "train")
    per_image = ann.groupby("image_id")
    all_normal = per_image.class_name.apply(lambda s: set(s) == {NO_FINDING})
    assert 0.3 <= all_normal.mean() <= 0.7  # about half the images are normal for every rater

    conflicting = [i for i, g in per_image
                   if (g.class_name == NO_FINDING).any() and (g.class_name != NO_FINDING).any()]
    assert conflicting, "no image where one rater says No finding and another reports findings"

    chains = 0
    boxes = ann.dropna(subset=BOX)
    for _, g in boxes.groupby(["image_id", "class_name"]):
        rows = list(g[["rad_id", *BOX]].itertuples(index=False))
        for a, b, c in itertools.permutations(rows, 3):
            if len({a[0], b[0], c[0]}) == 3 and _iou(a[1:], b[1:]) > 0.5 and _iou(b[1:], c[1:]) > 0.5 \
                    and _iou(a[1:], c[1:]) <= 0.5:
                chains += 1
    assert chains, "no chain of overlaps A~B, B~C with A not~C between three raters"

    # Ordinary agreement: most same-class boxes of different raters overlap above 0.5.
    pairs = [_iou(a[1:], b[1:]) for _, g in boxes.groupby(["image_id", "class_name"])
             for a, b in itertools.combinations(g[["rad_id", *BOX]].itertuples(index=False), 2)
             if a[0] != b[0]]
    assert pairs and np.mean(np.array(pairs) > 0.5) > 0.7


def test_every_dicom_decodes_with_two_decoders_and_all_variants_occur(root: Path):
    seen: dict[str, int] = {}
    bits = set()
    for path in sorted(root.glob("*/*.dicom")):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPClassUID in (
            "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1")  # DX for presentation, CR
        assert ds.Modality in ("DX", "CR") and ds.BitsAllocated == 16
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns) and ds.Rows != ds.Columns
        assert arr.min() >= (-(1 << (ds.BitsStored - 1)) if ds.PixelRepresentation else 0)
        assert arr.max() < (1 << (ds.BitsStored - int(ds.PixelRepresentation)))
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax in (RLELossless, JPEG2000Lossless):  # a second, independent decoder agrees
            other = "gdcm" if syntax == JPEG2000Lossless else "pydicom"
            np.testing.assert_array_equal(pixel_array(ds, decoding_plugin=other), arr)
        for name in ("PatientName", "PatientID", "AccessionNumber"):
            assert PHI_MARKER in str(ds.data_element(name).value)
        assert ds.PatientBirthDate and ds.StudyDate
        bits.add(int(ds.BitsStored))
        for variant, present in {
            ds.PhotometricInterpretation: True, syntax.name: True,
            "voi_lut_sequence": "VOILUTSequence" in ds,
            "no_window": "WindowCenter" not in ds and "VOILUTSequence" not in ds,
            "multi_window": "WindowCenter" in ds and ds.data_element("WindowCenter").VM > 1,
            "rescale": "RescaleSlope" in ds, "signed": ds.PixelRepresentation == 1,
        }.items():
            seen[variant] = seen.get(variant, 0) + int(present)
    for variant in ("MONOCHROME1", "MONOCHROME2", RLELossless.name, JPEG2000Lossless.name,
                    "Implicit VR Little Endian", "Explicit VR Little Endian", "voi_lut_sequence", "no_window",
                    "multi_window", "rescale", "signed"):
        assert seen.get(variant), f"no file with {variant}"
    assert bits == {12, 13, 14, 15, 16}


def test_polarity_and_windows_are_consistent(plain_root: Path):
    """Read correctly, every image shows dark lungs beside a bright mediastinum; windows fit the data."""
    for path in sorted(plain_root.glob("*/*.dicom")):
        ds = pydicom.dcmread(path)
        img = _display(ds)
        h, w = img.shape
        lung = img[int(0.40 * h):int(0.50 * h), int(0.26 * w):int(0.34 * w)].mean()
        mediastinum = img[int(0.30 * h):int(0.40 * h), int(0.47 * w):int(0.53 * w)].mean()
        air = img[int(0.02 * h):int(0.06 * h), :int(0.03 * w)].mean()
        assert air < lung < mediastinum, path.name
        if "WindowCenter" in ds:  # the first window spans the data: little is clipped at either end
            saturated = np.mean((img <= img.min()) | (img >= img.max()))
            assert saturated < 0.02, path.name


def test_findings_change_pixels_inside_their_boxes_only(root: Path, plain_root: Path):
    ann = _ann(root, "test").dropna(subset=BOX)
    assert len(ann) >= 3
    for image_id, rows in ann.groupby("image_id"):
        with_f = pydicom.dcmread(root / "test" / f"{image_id}.dicom").pixel_array.astype(np.float64)
        without = pydicom.dcmread(plain_root / "test" / f"{image_id}.dicom").pixel_array.astype(np.float64)
        diff = np.abs(with_f - without)
        inside = np.zeros(diff.shape, bool)
        data_range = without.max() - without.min()
        for r in rows.itertuples():
            box = (slice(int(np.floor(r.y_min)), int(np.ceil(r.y_max)) + 1),
                   slice(int(np.floor(r.x_min)), int(np.ceil(r.x_max)) + 1))
            inside[box] = True
            assert diff[box].mean() > 0.02 * data_range, (image_id, r.class_name)
        assert not diff[~inside].any(), image_id


def test_each_label_has_its_own_texture(tmp_path: Path):
    """Same label -> similar texture statistics; different labels -> different ones (display domain)."""
    root = _make(tmp_path / "v", n_train=0, n_test=2 * len(LOCAL_LABELS), no_finding_frac=0.0, max_side_px=400)
    plain = _make(tmp_path / "p", n_train=0, n_test=2 * len(LOCAL_LABELS), no_finding_frac=0.0,
                  max_side_px=400, draw_findings=False)
    ann = _ann(root, "test").dropna(subset=BOX)
    assert set(ann.class_name) == set(LOCAL_LABELS)
    signatures: dict[str, list[np.ndarray]] = {}
    for image_id, rows in ann.groupby("image_id"):
        a = _display(pydicom.dcmread(root / "test" / f"{image_id}.dicom"))
        b = _display(pydicom.dcmread(plain / "test" / f"{image_id}.dicom"))
        d = (a - b) / (b.max() - b.min())
        for r in rows.itertuples():
            patch = d[int(r.y_min):int(r.y_max), int(r.x_min):int(r.x_max)]
            # the low-frequency amplitude spectrum of the patch resampled to 32 x 32: its texture fingerprint
            yy = np.linspace(0, patch.shape[0] - 1, 32).astype(int)
            xx = np.linspace(0, patch.shape[1] - 1, 32).astype(int)
            spec = np.abs(np.fft.fftshift(np.fft.fft2(patch[np.ix_(yy, xx)])))[9:24, 9:24]
            signatures.setdefault(r.class_name, []).append(spec.ravel() / (np.linalg.norm(spec) + 1e-12))
    means = {k: np.mean(v, axis=0) for k, v in signatures.items()}
    for label, sig in means.items():
        others = [np.linalg.norm(sig - s) for k, s in means.items() if k != label]
        assert min(others) > 0.08, label


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    kw = dict(n_train=10, n_test=3, max_side_px=160)
    a = digest(_make(tmp_path / "a", **kw))
    assert a == digest(_make(tmp_path / "b", workers=2, **kw))
    c = digest(_make(tmp_path / "c", seed=1, **kw))
    assert set(a) != set(c)
    assert a["annotations/annotations_train.csv"] != c["annotations/annotations_train.csv"]


def test_kaggle_layout(tmp_path: Path):
    root = _make(tmp_path / "k", layout="kaggle", n_train=2 * 14, n_test=2)
    assert not (root / "annotations").exists()
    df = pd.read_csv(root / "train.csv")
    assert list(df.columns) == ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    assert (df.class_name == df.class_id.map(dict(enumerate(KAGGLE_CLASSES)))).all()
    assert set(df.class_name) == set(KAGGLE_CLASSES)
    no_finding = df.class_id == KAGGLE_CLASSES.index(NO_FINDING)
    assert df.loc[no_finding, BOX].isna().all().all()
    assert df.loc[~no_finding, BOX].notna().all().all()
    assert (df.groupby("image_id").rad_id.nunique() == 3).all()
    assert set(df.image_id) == {p.stem for p in (root / "train").glob("*.dicom")}
    assert len(list((root / "test").glob("*.dicom"))) == 2


def test_refuses_foreign_folder_and_replaces_its_own(tmp_path: Path):
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        _make(foreign, n_train=1, n_test=0)
    assert (foreign / "precious.txt").read_text() == "keep"

    own = _make(tmp_path / "own", n_train=4, n_test=2, max_side_px=128)
    _make(own, n_train=2, n_test=1, max_side_px=128)  # a smaller re-run leaves no stale images behind
    assert len(list((own / "train").glob("*.dicom"))) == 2 and len(list((own / "test").glob("*.dicom"))) == 1
    assert pd.read_csv(own / "annotations" / "image_labels_test.csv").shape[0] == 1


def test_cli(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["synth", "--out", str(out), "--train", "2", "--test", "1", "--max-side-px", "128",
                     "--workers", "1"]) == 0
    assert len(list(out.glob("*/*.dicom"))) == 3
    assert "(vindr format, physionet layout)" in capsys.readouterr().out
    assert cli.main(["synth", "--out", str(out), "--train", "1", "--test", "0", "--no-finding-frac", "1.5"]) == 2
    assert "no_finding_frac" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- csv and coco

GENERIC = dict(n_train=16, n_test=10, seed=4, max_side_px=200)


def _plans(fmt: str) -> list:
    kw = {k: v for k, v in GENERIC.items() if k not in ("n_train", "n_test", "seed")}
    return plan_dataset(GENERIC["n_train"], GENERIC["n_test"], GENERIC["seed"], fmt=fmt, **kw)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth_csv") / "nih", fmt="csv", **GENERIC)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth_coco") / "det", fmt="coco", **GENERIC)


def test_synthetic_vocabularies_are_not_vindrs():
    for vocabulary in (SYNTH_CSV, SYNTH_COCO):
        assert len(vocabulary.local_labels) != len(LOCAL_LABELS)
        assert len(vocabulary.global_labels) != len(GLOBAL_LABELS)
        assert set(vocabulary.all_labels) - {NO_FINDING} != set(VINDR_CXR.all_labels) - {NO_FINDING}
        assert list(vocabulary.local_labels) == sorted(vocabulary.local_labels)
        assert list(vocabulary.diseases) == sorted(vocabulary.diseases)
    assert (len(SYNTH_CSV.local_labels), len(SYNTH_CSV.diseases)) == (8, 3)
    assert (len(SYNTH_COCO.local_labels), SYNTH_COCO.diseases) == (5, ())


def test_box_csv_rows_are_the_plans(csv_root: Path):
    df = pd.read_csv(csv_root / "annotations.csv", dtype={"rater": str})
    assert list(df.columns) == list(CSV_COLUMNS)
    plans = _plans("csv")
    assert set(df.image) == {p.file for p in plans}
    assert {p.file for p in plans} == {f"images/{p.name}" for p in (csv_root / "images").iterdir()}
    assert set(df.label) <= set(SYNTH_CSV.all_labels)

    def rows(frame: pd.DataFrame) -> list[tuple]:
        return sorted((r.label, *(() if np.isnan(r.x_min) else (r.x_min, r.y_min, r.x_max, r.y_max)))
                      for r in frame.itertuples())

    def expected(findings, diagnoses) -> list[tuple]:
        return sorted([(f.label, *f.box) for f in findings] + [(g,) for g in diagnoses]) or [(NO_FINDING,)]

    for plan in plans:
        mine = df[df.image == plan.file]
        assert set(mine.split) == {plan.split}
        if plan.split == "train":
            assert sorted(set(mine.rater)) == sorted(r.rad_id for r in plan.readings)
            for r in plan.readings:
                assert rows(mine[mine.rater == r.rad_id]) == expected(r.findings, r.diagnoses)
        else:  # the consensus: rater cells empty
            assert mine.rater.isna().all()
            assert rows(mine) == expected(plan.truth, plan.diagnoses)
    assert df[df.split == "train"].rater.notna().all()
    assert (df[df.split == "train"].groupby("image").rater.nunique() == 3).all()


def test_box_csv_labels_yaml_is_what_the_rows_imply(csv_root: Path):
    """Boxed labels are local, never-boxed ones global, in sorted order: what prepare infers."""
    df = pd.read_csv(csv_root / "annotations.csv")
    boxed = df.dropna(subset=BOX)
    assert boxed[BOX].notna().all().all() and df[df.x_min.isna()][BOX].isna().all().all()
    inferred = Vocabulary.build(csv_root.name, sorted(set(boxed.label)),
                                sorted(set(df.label) - set(boxed.label) - {NO_FINDING}))
    assert Vocabulary.from_yaml(csv_root / "labels.yaml") == inferred
    assert inferred == dataclasses.replace(SYNTH_CSV, name=csv_root.name)
    for image, rows in boxed.groupby("image"):
        cols, n_rows = _size(csv_root / image)
        assert (rows.x_min >= 0).all() and (rows.y_min >= 0).all()
        assert (rows.x_max <= cols - 1).all() and (rows.y_max <= n_rows - 1).all()


def _size(path: Path) -> tuple[int, int]:
    """(columns, rows) of a DICOM, PNG or JPEG file."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return ds.Columns, ds.Rows
    with Image.open(path) as im:
        return im.size


def test_box_csv_images_decode_to_the_planned_pixels(csv_root: Path):
    seen = set()
    for plan in _plans("csv"):
        path = csv_root / plan.file
        expected = render(plan)
        if plan.encoding == "dicom":
            ds = pydicom.dcmread(path)
            assert ds.pixel_array.shape == (plan.rows, plan.cols) and PHI_MARKER in str(ds.PatientName)
            seen.add("dicom")
            continue
        with Image.open(path) as im:
            assert im.size == (plan.cols, plan.rows)
            seen.add((im.format, im.mode))
            arr = np.asarray(im).astype(np.float64)
        if im.mode == "RGB":
            assert (arr == arr[..., :1]).all()
            arr = arr[..., 0]
        scale = 65535.0 if im.mode == "I;16" else 255.0
        err = np.abs(arr / scale - expected)
        assert (err.mean() < 0.01) if im.format == "JPEG" else (err.max() <= 0.5 / scale + 1e-6), plan.file
    assert seen == {"dicom", ("PNG", "L"), ("PNG", "I;16"), ("PNG", "RGB"), ("JPEG", "L")}
    assert len(ENCODINGS["csv"]) == 5


def test_coco_files_are_the_plans(coco_root: Path):
    plans = {p.file: p for p in _plans("coco")}
    assert sorted(p.name for p in (coco_root / "annotations").iterdir()) == [
        "instances_test.json", "instances_train.json"]
    image_ids, annotation_ids, n_images = set(), set(), 0
    for split in ("train", "test"):
        doc = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        names = [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
        assert names == list(SYNTH_COCO.local_labels)
        by_id = {c["id"]: c["name"] for c in doc["categories"]}
        for image in doc["images"]:
            plan = plans[f"images/{image['file_name']}"]
            assert plan.split == split and (image["width"], image["height"]) == (plan.cols, plan.rows)
            with Image.open(coco_root / "images" / image["file_name"]) as im:
                assert im.format == "PNG" and im.size == (plan.cols, plan.rows)
                assert np.abs(np.asarray(im) / 255.0 - render(plan)).max() <= 0.5 / 255 + 1e-6
            got = sorted((by_id[a["category_id"]], round(a["bbox"][0], 2), round(a["bbox"][1], 2),
                          round(a["bbox"][0] + a["bbox"][2], 2), round(a["bbox"][1] + a["bbox"][3], 2))
                         for a in doc["annotations"] if a["image_id"] == image["id"])
            assert got == sorted((f.label, *f.box) for f in plan.truth)  # none: a no-finding image
            image_ids.add(image["id"])
            n_images += 1
        annotation_ids |= {a["id"] for a in doc["annotations"]}
        assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 and a["iscrowd"] == 0 for a in doc["annotations"])
    assert n_images == len(image_ids) == len(plans)
    assert any(not p.truth for p in plans.values()) and any(p.truth for p in plans.values())
    assert Vocabulary.from_yaml(coco_root / "labels.yaml") == dataclasses.replace(SYNTH_COCO, name=coco_root.name)


@pytest.mark.parametrize("fmt", ["csv", "coco"])
def test_new_formats_rerun_gives_identical_bytes(fmt: str, tmp_path: Path):
    kw = dict(n_train=6, n_test=4, max_side_px=128, fmt=fmt)
    first = _digest(_make(tmp_path / "a" / "root", **kw))
    assert first == _digest(_make(tmp_path / "a" / "root", workers=2, **kw))  # over its own earlier run
    assert first == _digest(_make(tmp_path / "b" / "root", **kw))
    assert first != _digest(_make(tmp_path / "c" / "root", seed=1, **kw))


def test_rerun_in_another_format_replaces_every_file(tmp_path: Path):
    out = tmp_path / "root"
    kw = dict(n_train=5, n_test=2, max_side_px=128)
    _make(out, fmt="csv", **kw)
    _make(out, **kw)
    assert sorted(p.name for p in out.iterdir()) == [SENTINEL, "annotations", "test", "train"]
    _make(out, fmt="coco", **kw)
    assert sorted(p.name for p in out.iterdir()) == [SENTINEL, "annotations", "images", "labels.yaml"]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["instances_test.json", "instances_train.json"]
    _make(out, fmt="csv", **kw)
    assert sorted(p.name for p in out.iterdir()) == [SENTINEL, "annotations.csv", "images", "labels.yaml"]
    assert len(list((out / "images").iterdir())) == 7
    foreign = tmp_path / "real"
    (foreign / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        _make(foreign, fmt="coco", **kw)


def test_cli_format(tmp_path: Path, capsys):
    out = tmp_path / "coco"
    assert cli.main(["synth", "--out", str(out), "--format", "coco", "--train", "2", "--test", "1",
                     "--max-side-px", "128", "--workers", "1"]) == 0
    assert "(coco format)" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.png"))) == 3
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--format", "csv", "--layout", "kaggle"]) == 2
    assert "layout 'kaggle'" in capsys.readouterr().err
