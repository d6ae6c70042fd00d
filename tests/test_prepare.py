"""`litegpt prepare` end to end on the synthetic dataset: contents, determinism, bad input, resume."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import webdataset as wds
from PIL import Image

from litegpt.cli import main as cli
from litegpt.data import integrity
from litegpt.data import prepare as prepare_module
from litegpt.data.inspection import draw_samples, label_colour, summary
from litegpt.data.prepare import PrepareConfig, prepare
from litegpt.data.shards import read_manifest
from litegpt.data.synth import PHI_MARKER
from litegpt.labels import VINDR_CXR


def tar_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def expected_ids(root: Path) -> dict[str, set[str]]:
    """Image ids the `drop` policy keeps, computed from the CSVs with pandas alone."""
    out = {}
    for split in ("train", "test"):
        boxes = pd.read_csv(root / f"annotations/annotations_{split}.csv")
        labels = pd.read_csv(root / f"annotations/image_labels_{split}.csv")
        ids = set(labels.image_id)
        if split == "train":
            diseases = [c for c in labels.columns if c in VINDR_CXR.diseases or c == "Other diseases"]
            says = labels.assign(something=labels[diseases].sum(axis=1) > 0)[["image_id", "rad_id", "something"]]
            boxed = boxes[boxes.class_name != VINDR_CXR.no_finding][["image_id", "rad_id"]].drop_duplicates().assign(box=True)
            says = says.merge(boxed, on=["image_id", "rad_id"], how="left").fillna({"box": False})
            says["something"] = says.something | says.box.astype(bool)
            per_image = says.groupby("image_id").something.agg(["any", "all"])
            ids -= set(per_image.index[per_image["any"] & ~per_image["all"]])
        out[split] = ids
    return out


def test_shards_hold_exactly_the_kept_images(prepared, synth_root):
    manifest = read_manifest(prepared)
    expected = expected_ids(synth_root)
    assert 0 < len(expected["train"]) < 40  # the synthetic raters do conflict sometimes
    for split in ("train", "test"):
        urls = [str(prepared / s["name"]) for s in manifest["shards"] if s["split"] == split]
        keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
        assert len(keys) == len(set(keys)) == manifest["splits"][split]["samples"]
        assert set(keys) == expected[split]
        assert sum(s["samples"] for s in manifest["shards"] if s["split"] == split) == len(keys)
    dropped = {d["image_id"] for d in manifest["dropped"]}
    all_ids = set(pd.read_csv(synth_root / "annotations/image_labels_train.csv").image_id)
    assert dropped == all_ids - expected["train"]  # nothing lost silently
    assert all(d["kind"] == "label_policy" for d in manifest["dropped"])


def test_boxes_are_drawn_boxes_normalised_by_the_original_size(prepared, synth_root):
    rows = pd.read_csv(synth_root / "annotations/annotations_train.csv")
    rows = rows[rows.class_name != VINDR_CXR.no_finding]
    for shard in sorted(prepared.glob("train-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False).decode("pill"):
            meta = sample["json"]
            ds = pydicom.dcmread(synth_root / "train" / f"{meta['image_id']}.dicom", stop_before_pixels=True)
            assert (meta["source"]["rows"], meta["source"]["cols"]) == (ds.Rows, ds.Columns)
            assert max(sample["png"].size) == min(1024, max(ds.Rows, ds.Columns))
            mine = rows[rows.image_id == meta["image_id"]]
            for finding in meta["findings"]:
                x0, y0, x1, y1 = np.array(finding["box"]) * [ds.Columns, ds.Rows, ds.Columns, ds.Rows]
                candidates = mine[mine.class_name == finding["label"]][["x_min", "y_min", "x_max", "y_max"]].to_numpy()
                assert np.abs(candidates - [x0, y0, x1, y1]).max(axis=1).min() < 1e-6  # medoid = a drawn box


def test_worker_count_does_not_change_a_byte(prepared, synth_root, tmp_path):
    prepare(PrepareConfig(root=synth_root, out=tmp_path, samples_per_shard=8, workers=2))
    assert tar_bytes(tmp_path) == tar_bytes(prepared)
    assert json.loads((tmp_path / "manifest.json").read_text()) == read_manifest(prepared)


def test_no_patient_data_reaches_the_shards(prepared, synth_root):
    some = next((synth_root / "train").glob("*.dicom"))
    assert PHI_MARKER in str(pydicom.dcmread(some).PatientName)  # the synthetic headers do carry it
    for data in tar_bytes(prepared).values():
        assert PHI_MARKER.encode() not in data


@pytest.fixture()
def broken_root(synth_root, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the synthetic root with three broken DICOMs."""
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    ids = sorted(expected_ids(synth_root)["test"])[:3]
    files = [root / "test" / f"{i}.dicom" for i in ids]
    files[0].write_bytes(files[0].read_bytes()[:2000])  # truncated
    files[1].write_text("this is not a DICOM file\n")
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2])
    return root, ids


def test_broken_dicoms_are_skipped_named_and_listed(broken_root, tmp_path, capsys):
    root, broken = broken_root
    out = tmp_path / "out"
    assert cli(["prepare", "--root", str(root), "--out", str(out), "--workers", "2", "--samples-per-shard", "8"]) == 0
    manifest = read_manifest(out)
    bad = {d["image_id"]: d for d in manifest["dropped"] if d["kind"] == "bad_dicom"}
    assert set(bad) == set(broken)
    for image_id, entry in bad.items():
        assert f"{image_id}.dicom" in entry["reason"]
    assert "PixelData" in bad[broken[2]]["reason"] or "pixel data" in bad[broken[2]]["reason"].lower()
    assert manifest["splits"]["test"]["samples"] == len(expected_ids(root)["test"]) - 3
    assert f"{broken[0]}.dicom" in capsys.readouterr().err
    # a limit on unusable inputs turns the same run into a failure
    assert cli(["prepare", "--root", str(root), "--out", str(tmp_path / "strict"), "--max-bad", "2"]) == 1


def test_missing_csv_column_stops_before_any_work(synth_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    csv = root / "annotations/annotations_train.csv"
    pd.read_csv(csv).drop(columns=["y_max"]).to_csv(csv, index=False)
    assert cli(["prepare", "--root", str(root), "--out", str(tmp_path / "out")]) == 1
    assert "annotations_train.csv: missing required column(s) y_max" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_complete_looking_shard_and_resumes(prepared, synth_root, tmp_path, monkeypatch):
    real = prepare_module.convert_image
    calls = {"n": 0}

    def dies_on_the_20th(job, cfg):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the third shard
        return real(job, cfg)

    cfg = PrepareConfig(root=synth_root, out=tmp_path, samples_per_shard=8, workers=1)
    monkeypatch.setattr(prepare_module, "convert_image", dies_on_the_20th)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "manifest.json").exists()
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}

    monkeypatch.setattr(prepare_module, "convert_image", real)
    prepare(cfg)
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in first} == first  # not rewritten
    assert tar_bytes(tmp_path) == tar_bytes(prepared)
    assert json.loads((tmp_path / "manifest.json").read_text()) == read_manifest(prepared)
    assert not (tmp_path / ".partial").exists()

    # other parameters (asked for): the old shards are replaced, nothing stale survives
    prepare(PrepareConfig(root=synth_root, out=tmp_path, samples_per_shard=100, workers=1, overwrite=True))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]


def test_kaggle_layout_end_to_end(tmp_path):
    from litegpt.data.synth import synthesize

    root = synthesize(tmp_path / "kaggle", 30, 0, seed=3, layout="kaggle", max_side_px=400, progress=False)
    manifest = prepare(PrepareConfig(root=root, out=tmp_path / "out", holdout=0.3, workers=1))
    assert manifest["source"]["layout"] == "kaggle" and manifest["source"]["holdout"] == 0.3
    kept = sum(manifest["splits"][s]["samples"] for s in ("train", "test"))
    assert manifest["splits"]["test"]["samples"] > 0
    assert kept + len(manifest["dropped"]) == 30


def test_inspect_summarises_and_draws(prepared, tmp_path):
    manifest = read_manifest(prepared)
    text = summary(manifest)
    assert f"train: {manifest['splits']['train']['samples']} images" in text
    paths = draw_samples(prepared, tmp_path, 2, "test")
    assert len(paths) == 2
    sample = next(s for s in wds.WebDataset(str(prepared / "test-000000.tar"), shardshuffle=False).decode("pill")
                  if s["__key__"] == paths[0].stem)
    finding = sample["json"]["findings"][0]
    picture = np.asarray(Image.open(paths[0]).convert("RGB"))
    h, w = picture.shape[:2]
    x0, y0, x1, y1 = finding["box"]
    edge = picture[int((y0 + y1) / 2 * h), int(round(x0 * w))]  # the left edge of the box, halfway down
    assert tuple(edge) == label_colour(finding["label"], VINDR_CXR.local_labels)


def test_max_pixels_drops_larger_dicoms_before_decoding_and_lists_them(synth_root, tmp_path):
    """--max-pixels: the DICOMs whose header claims more values (by pydicom's reading of the header) are
    dropped and listed, the rest converted; the limit is one of the shard set's parameters."""
    sizes = {}
    for path in sorted(synth_root.glob("*/*.dicom")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sizes[path.stem] = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * int(ds.get("NumberOfFrames", 1))
    limit = sorted(sizes.values())[len(sizes) // 2]
    out = tmp_path / "out"
    assert cli(["prepare", "--root", str(synth_root), "--out", str(out), "--workers", "1",
                "--max-pixels", str(limit)]) == 0
    manifest = read_manifest(out)
    refused = {d["image_id"] for d in manifest["dropped"] if "refused before decoding" in d["reason"]}
    not_converted = {d["image_id"] for d in manifest["dropped"] if d["kind"] == "label_policy"}  # never decoded
    assert refused == {image_id for image_id, n in sizes.items() if n > limit} - not_converted != set()
    assert manifest["params"]["max_pixels"] == limit
    repair = shlex.split(integrity.prepare_command(out, manifest))  # what a damaged-shard message prints
    assert repair[:2] == ["litegpt", "prepare"] and cli(repair[1:]) == 0  # accepted: the same parameters
    assert cli(["prepare", "--root", str(synth_root), "--out", str(tmp_path / "x"), "--max-pixels", "0"]) == 2
