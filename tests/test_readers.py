"""The generic box CSV and COCO readers, and `prepare` on them: small roots written here with Pillow."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from litegpt.cli import main as cli
from litegpt.data import integrity
from litegpt.data.dicom import ConvertConfig
from litegpt.data.inspection import draw_samples, summary
from litegpt.data.prepare import PrepareConfig, prepare
from litegpt.data.readers import read_dataset
from litegpt.data.shards import iter_samples, read_manifest
from litegpt.data.sources import DatasetError
from litegpt.grammar import PAPER_TEMPLATE, Grammar, TaskTemplate
from litegpt.labels import VINDR_CXR, Vocabulary

HEADER = "image,label,x_min,y_min,x_max,y_max,rater,split\n"


def image(path: Path, size=(80, 60), mode="L", fmt=None) -> None:
    """A small image with a gradient, so that it converts to something non-constant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    ramp = np.add.outer(np.arange(h), np.arange(w))
    if mode == "I;16":
        Image.fromarray((ramp * 300).astype(np.uint16)).save(path)
    elif mode == "RGB":
        Image.fromarray(np.stack([ramp % 256] * 3, axis=-1).astype(np.uint8)).save(path, fmt)
    else:
        Image.fromarray((ramp % 256).astype(np.uint8)).save(path, fmt)


def csv_root(root: Path, rows: str, header: str = HEADER, images=("images/p1.png", "images/p2.jpg",
                                                                   "images/p3.png", "images/p4.png")) -> Path:
    for name in images:
        image(root / name, mode="RGB" if name.endswith(".jpg") else "L")
    (root / "annotations.csv").write_text(header + rows)
    return root


ROWS = ("images/p1.png,Mass,10,10,30,20,R1,train\n"
        "images/p1.png,Mass,11,10,30,21,R2,train\n"
        "images/p1.png,Fibrosis,,,,,R2,train\n"
        "images/p2.jpg,No finding,,,,,R1,train\n"
        "images/p2.jpg,No finding,,,,,R2,train\n"
        "images/p3.png,Effusion,5,5,25,25,,test\n"
        "images/p3.png,Fibrosis,,,,,,test\n"
        "images/p4.png,No finding,,,,,,test\n")


def test_csv_reads_raters_splits_and_infers_the_vocabulary(tmp_path):
    root = csv_root(tmp_path / "mydata", ROWS)
    records, problems, vocabulary = read_dataset(root, "csv")
    assert problems == []
    assert vocabulary == Vocabulary.build("mydata", ["Effusion", "Mass"], ["Fibrosis"])  # sorted, named by folder
    by_id = {r.image_id: r for r in records}
    assert [(r.split, r.image_id) for r in records] == [
        ("test", "images/p3"), ("test", "images/p4"), ("train", "images/p1"), ("train", "images/p2")]
    p1 = by_id["images/p1"]
    assert not p1.consensus and p1.path == root / "images/p1.png"
    assert [(a.rater, a.label, a.box, a.row) for a in p1.annotations] == [
        ("R1", "Mass", (10.0, 10.0, 30.0, 20.0), 2), ("R2", "Mass", (11.0, 10.0, 30.0, 21.0), 3)]
    assert p1.global_labels == {"R2": {"Fibrosis"}}
    assert by_id["images/p3"].consensus and by_id["images/p3"].global_labels == {"consensus": {"Fibrosis"}}


def test_csv_without_rater_and_split_columns_is_a_consensus_with_the_hash_holdout(tmp_path):
    header = "image,label,x_min,y_min,x_max,y_max\n"
    rows = "".join(f"images/p{i}.png,Mass,1,1,5,5\n" for i in range(1, 9))
    root = csv_root(tmp_path, rows, header, images=[f"images/p{i}.png" for i in range(1, 9)])
    records, problems, vocabulary = read_dataset(root, "csv", holdout=0.5)
    assert problems == [] and vocabulary.global_labels == ("No finding",)
    assert all(r.consensus for r in records) and {r.split for r in records} == {"train", "test"}
    again = read_dataset(root, "csv", holdout=0.5).records
    assert [(r.image_id, r.split) for r in again] == [(r.image_id, r.split) for r in records]


def test_csv_bad_rows_remove_their_image_naming_file_line_and_value(tmp_path):
    rows = ("images/p1.png,Mass,30,10,10,20,R1,train\n"     # line 2: x_max < x_min
            "images/p2.jpg,Masss,1,1,5,5,R1,train\n"        # line 3: not in the list
            "images/p3.png,Mass,,,,,,test\n"                 # line 4: a local label without a box
            "images/p4.png,Fibrosis,1,1,5,5,,test\n"         # line 5: a global label with a box
            "images/p9.png,Mass,1,1,5,5,,test\n")            # line 6: no such file
    root = csv_root(tmp_path, rows)
    vocabulary = Vocabulary.build("mine", ["Mass"], ["Fibrosis"])
    records, problems, got = read_dataset(root, "csv", vocabulary=vocabulary)
    assert records == [] and got == vocabulary
    reasons = {p.image_id: (p.kind, p.reason) for p in problems}
    assert reasons["images/p1"][0] == "bad_annotation" and reasons["images/p1"][1].startswith("annotations.csv line 2:")
    assert "x_max <= x_min" in reasons["images/p1"][1]
    assert "line 3" in reasons["images/p2"][1] and "'Masss'" in reasons["images/p2"][1]
    assert "line 4" in reasons["images/p3"][1] and "needs a box" in reasons["images/p3"][1]
    assert "line 5" in reasons["images/p4"][1] and "global label, it cannot have a box" in reasons["images/p4"][1]
    assert reasons["images/p9"][0] == "missing_file" and "images/p9.png does not exist" in reasons["images/p9"][1]


def test_csv_repeats_mixed_raters_and_unannotated_files(tmp_path):
    rows = ("images/p1.png,Mass,1,1,5,5,R1,train\n"
            "images/p1.png,Mass,1.0,1,5,5,R1,train\n"       # line 3 repeats line 2
            "images/p2.jpg,Mass,1,1,5,5,R1,train\n"
            "images/p2.jpg,No finding,,,,,,train\n")        # line 5: a consensus row beside a rater's
    root = csv_root(tmp_path, rows, images=("images/p1.png", "images/p2.jpg", "images/extra.png"))
    records, problems, _ = read_dataset(root, "csv")
    assert [r.image_id for r in records] == ["images/p1"] and len(records[0].annotations) == 1
    assert {(p.image_id, p.kind) for p in problems} == {
        ("images/p1", "duplicate_row"), ("images/extra", "bad_annotation"), ("images/p2", "bad_annotation")}
    reasons = {p.image_id: p.reason for p in problems}
    assert reasons["images/p1"] == "annotations.csv: line 3 repeats line 2; each repeated row is used once"
    assert "line 5" in reasons["images/p2"] and "a rater and rows without" in reasons["images/p2"]
    assert "extra.png has no annotation in annotations.csv" in reasons["images/extra"]


@pytest.mark.parametrize(("rows", "header", "message"), [
    ("", "image,label,x_min,y_min,x_max\n", r"annotations.csv: missing required column\(s\) y_max"),
    ("images/p1.png,Mass,1,1,5,5,R1,val\n", HEADER, r"line 2: split 'val' is not one of train, test"),
    ("images/p1.png,Mass,1,1,5,5,R1,train\nimages/p1.png,Mass,2,2,6,6,R2,test\n", HEADER,
     r"line 3: image images/p1 is in split 'test' here but 'train' on line 2"),
    ("images/p1.png,Mass,1,1,5,5,R1,train\nimages/p2.jpg,mass,,,,,R1,train\n", HEADER,
     r"label 'mass' has a box on line 2 and none on line 3"),
    ("images/p1.gif,Mass,1,1,5,5,R1,train\n", HEADER, r"line 2: image 'images/p1.gif' is not a relative path"),
    ("../p1.png,Mass,1,1,5,5,R1,train\n", HEADER, r"line 2: image '../p1.png' is not a relative path"),
    ("images/p1.png,Fibrosis,,,,,R1,train\n", HEADER, r"cannot infer the label vocabulary: .*no local labels"),
])
def test_csv_errors_that_stop_before_any_work(tmp_path, rows, header, message):
    root = csv_root(tmp_path, rows, header)
    with pytest.raises(DatasetError, match=message):
        read_dataset(root, "csv")


# ---- COCO

CATEGORIES = [{"id": 2, "name": "Nodule"}, {"id": 1, "name": "Mass"}]


def coco_root(root: Path, train: dict | None, test: dict | None = None) -> Path:
    (root / "annotations").mkdir(parents=True)
    for split, data in (("train", train), ("test", test)):
        if data is not None:
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
            for entry in data.get("images", []):
                image(root / "images" / entry["file_name"])
    return root


def coco(images: list[str], annotations: list[dict], categories=CATEGORIES) -> dict:
    return {"images": [{"id": i + 1, "file_name": name} for i, name in enumerate(images)],
            "annotations": annotations, "categories": categories}


def box(id_: int, image_id: int, category_id: int, bbox) -> dict:
    return {"id": id_, "image_id": image_id, "category_id": category_id, "bbox": bbox}


def test_coco_reads_boxes_and_infers_a_detection_only_vocabulary(tmp_path):
    train = coco(["a.png", "sub/b.png"], [box(10, 1, 2, [10, 20, 30, 5]), box(11, 1, 1, [0, 0, 4, 4]),
                                         box(12, 1, 2, [10, 20, 30, 5])])
    test = coco(["c.png"], [])
    root = coco_root(tmp_path / "det", train, test)
    records, problems, vocabulary = read_dataset(root, "coco")
    assert vocabulary == Vocabulary.build("det", ["Mass", "Nodule"], [])  # category id order, no diseases
    assert [(r.split, r.image_id) for r in records] == [("test", "c"), ("train", "a"), ("train", "sub/b")]
    a = records[1]
    assert a.consensus and a.path == root / "images" / "a.png"
    assert [(x.label, x.box, x.row) for x in a.annotations] == [("Nodule", (10.0, 20.0, 40.0, 25.0), 10),
                                                              ("Mass", (0.0, 0.0, 4.0, 4.0), 11)]
    assert [(x.rater, x.label, x.box) for x in records[2].annotations] == [("consensus", "No finding", None)]
    (problem,) = problems
    assert (problem.image_id, problem.kind) == ("a", "duplicate_row")
    assert problem.reason == ("instances_train.json: annotation id 12 repeats annotation id 10; "
                              "each repeated row is used once")


def test_coco_train_only_uses_the_holdout_and_bad_boxes_remove_their_image(tmp_path):
    names = [f"i{n}.png" for n in range(10)]
    train = coco(names, [box(1, 1, 1, [5, 5, 0, 3]), box(2, 2, 1, [5, 5, "x", 3])])
    root = coco_root(tmp_path, train)
    records, problems, _ = read_dataset(root, "coco", holdout=0.5)
    assert {r.split for r in records} == {"train", "test"} and len(records) == 8
    reasons = {p.image_id: p.reason for p in problems}
    assert "annotation id 1: bbox [5, 5, 0, 3] has a width or height <= 0" in reasons["i0"]
    assert "annotation id 2: bbox [5, 5, 'x', 3] is not four numbers" in reasons["i1"]


@pytest.mark.parametrize(("data", "message"), [
    (coco(["a.png"], [box(7, 9, 1, [1, 1, 2, 2])]), r"annotation id 7: image_id 9 is not an image of this file"),
    (coco(["a.png"], [box(7, 1, 5, [1, 1, 2, 2])]), r"annotation id 7: category_id 5 is not a category"),
    ({"images": [], "annotations": []}, r"'categories' must be a list"),
    (coco(["a.png", "a.png"], []), r"images\[1\]: a.png is listed twice"),
    (coco(["/abs/a.png"], []), r"images\[0\]: image '/abs/a.png' is not a relative path"),
    (coco([], [], [{"id": 1, "name": "Mass"}, {"id": 2, "name": "mass"}]), r"label 'mass' is given twice"),
])
def test_coco_errors_that_stop_before_any_work(tmp_path, data, message):
    with pytest.raises(DatasetError, match=message):
        read_dataset(coco_root(tmp_path, data), "coco")


def test_coco_malformed_json_and_unknown_category_with_a_label_list(tmp_path):
    root = coco_root(tmp_path, coco(["a.png"], []))
    with pytest.raises(DatasetError, match=r"category id 2: unknown label 'Nodule'"):
        read_dataset(root, "coco", vocabulary=Vocabulary.build("mine", ["Mass"]))
    with pytest.raises(DatasetError, match=r"'Mass' is not a local label"):
        read_dataset(root, "coco", vocabulary=Vocabulary.build("mine", ["Nodule"], ["Mass"]))
    (root / "annotations" / "instances_train.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"instances_train.json: not valid JSON \(line 2 column"):
        read_dataset(root, "coco")
    (root / "annotations" / "instances_train.json").unlink()
    with pytest.raises(DatasetError, match=r"not a COCO root"):
        read_dataset(root, "coco")


# ---- prepare on them


def test_prepare_csv_writes_the_vocabulary_template_and_png_jpeg_samples(tmp_path):
    root = csv_root(tmp_path / "mydata", ROWS)
    image(root / "images/p4.png", size=(600, 300), mode="I;16")  # 16-bit, resized to max_side
    (root / "images/p3.png").write_bytes(b"not a png")
    manifest = prepare(PrepareConfig(root=root, out=tmp_path / "out", format="csv", samples_per_shard=2, workers=1,
                                     convert=ConvertConfig(max_side=64)))
    vocabulary = Vocabulary.build("mydata", ["Effusion", "Mass"], ["Fibrosis"])
    assert Grammar.from_record(manifest).vocabulary == vocabulary
    assert manifest["template"] == PAPER_TEMPLATE.to_dict()
    assert manifest["source"]["format"] == "csv" and manifest["source"]["layout"] == "csv"
    assert manifest["params"]["format"] == "csv" and manifest["params"]["vocabulary"] == vocabulary.to_dict()
    assert "template" not in manifest["params"]
    (bad,) = manifest["dropped"]
    assert (bad["image_id"], bad["kind"]) == ("images/p3", "bad_image") and "p3.png: cannot read image" in bad["reason"]
    samples = {s["__key__"]: s for split in ("train", "test") for s in iter_samples(tmp_path / "out", split)}
    assert sorted(samples) == ["images/p1", "images/p2", "images/p4"]
    p1 = samples["images/p1"]["json"]
    (finding,) = p1["findings"]  # the two raters' overlapping boxes merged into one of them (the medoid)
    assert finding["label"] == "Mass" and finding["box"] in ([10 / 80, 10 / 60, 30 / 80, 20 / 60],
                                                             [11 / 80, 10 / 60, 30 / 80, 21 / 60])
    assert p1["diagnoses"] == ["Fibrosis"] and p1["n_raters"] == 2
    assert samples["images/p2"]["json"]["diagnoses"] == ["No finding"]
    p4 = samples["images/p4"]
    assert p4["png"].size == (64, 32) and (p4["json"]["source"]["rows"], p4["json"]["source"]["cols"]) == (300, 600)
    assert p4["json"]["source"]["bits_stored"] == 16
    assert manifest["splits"]["train"]["images"] == {"Mass": 1, "Fibrosis": 1, "No finding": 1}
    text = summary(manifest)
    assert "labels: 'mydata' (2 local, 2 global labels)" in text and "Effusion" in text
    drawn = draw_samples(tmp_path / "out", tmp_path / "drawn", 2, "train")
    assert drawn == [tmp_path / "drawn/images/p1.png", tmp_path / "drawn/images/p2.png"]


def test_prepare_cli_labels_and_template_files_and_the_rebuild_hint(tmp_path):
    root = csv_root(tmp_path / "mydata", ROWS)
    labels = tmp_path / "labels.yaml"
    labels.write_text(yaml.safe_dump({"name": "nih-like", "local_labels": ["Mass", "Effusion"],
                                      "global_labels": ["Fibrosis"], "no_finding": "No finding"}))
    template = tmp_path / "template.yaml"
    template.write_text("no_findings: nothing remarkable\nidentify: Describe the findings with their boxes.\n")
    out = tmp_path / "out"
    assert cli(["prepare", "--format", "csv", "--root", str(root), "--out", str(out), "--workers", "1",
                "--labels", str(labels), "--template", str(template)]) == 0
    manifest = read_manifest(out)
    grammar = Grammar.from_record(manifest)
    assert grammar.vocabulary.name == "nih-like" and grammar.vocabulary.local_labels == ("Mass", "Effusion")
    assert grammar.template == TaskTemplate(no_findings="nothing remarkable",
                                            identify="Describe the findings with their boxes.")
    assert manifest["params"]["template"] == grammar.template.to_dict()
    repair = shlex.split(integrity.prepare_command(out, manifest))
    assert repair[repair.index("--labels") + 1] == str(labels) and repair[repair.index("--template") + 1] == str(template)
    assert cli(repair[1:]) == 0 and read_manifest(out)["inputs_sha256"] == manifest["inputs_sha256"]

    # lists on the command line, and an inferred vocabulary: the hint spells them out and rebuilds the same set
    for extra in (["--local-labels", "Mass, Effusion", "--global-labels", "Fibrosis", "--no-finding", "No finding"], []):
        out = tmp_path / f"out{len(extra)}"
        assert cli(["prepare", "--format", "csv", "--root", str(root), "--out", str(out), "--workers", "1", *extra]) == 0
        manifest = read_manifest(out)
        repair = shlex.split(integrity.prepare_command(out, manifest))
        assert "--local-labels" in repair and cli(repair[1:]) == 0
        assert read_manifest(out)["inputs_sha256"] == manifest["inputs_sha256"]

    bad = ["prepare", "--format", "csv", "--root", str(root), "--out", str(tmp_path / "x")]
    assert cli([*bad, "--labels", str(labels), "--local-labels", "Mass"]) == 2
    assert cli([*bad, "--global-labels", "Fibrosis"]) == 2
    assert cli([*bad, "--layout", "kaggle"]) == 2
    assert cli([*bad, "--template", str(labels)]) == 2  # not template fields
    assert cli([*bad, "--local-labels", "Mass"]) == 0  # Effusion and Fibrosis are not in the list
    dropped = {d["image_id"]: d["reason"] for d in read_manifest(tmp_path / "x")["dropped"]}
    assert dropped == {"images/p1": "annotations.csv line 4: unknown label 'Fibrosis'; mydata has Mass, No finding",
                       "images/p3": "annotations.csv line 7: unknown label 'Effusion'; mydata has Mass, No finding"}


def test_prepare_coco_end_to_end(tmp_path):
    train = coco([f"i{n}.png" for n in range(6)], [box(1, 1, 1, [10, 10, 20, 20]), box(2, 2, 2, [0, 0, 8, 8])])
    root = coco_root(tmp_path / "det", train, coco(["t.png"], [box(1, 1, 2, [1, 1, 5, 5])]))
    manifest = prepare(PrepareConfig(root=root, out=tmp_path / "out", format="coco", workers=1))
    assert manifest["vocabulary"] == Vocabulary.build("det", ["Mass", "Nodule"], []).to_dict()
    assert manifest["splits"]["train"]["samples"] == 6 and manifest["splits"]["test"]["samples"] == 1
    assert manifest["splits"]["train"]["images"] == {"Mass": 1, "Nodule": 1, "No finding": 4}
    assert manifest["source"]["global_labels"] is False and manifest["dropped"] == []


def test_vindr_params_are_unchanged_by_the_vocabulary(tmp_path):
    """The VinDr-CXR defaults add nothing to params, so fingerprints of sets made before stay valid."""
    before = json.loads((Path(__file__).parent / "data" / "vindr_before_vocabulary.json").read_text())
    for layout in ("physionet", "kaggle"):
        old = before[layout]["manifest"]["params"]
        for vocabulary in (None, VINDR_CXR):
            cfg = PrepareConfig(root=tmp_path, out=tmp_path, layout=layout, samples_per_shard=6, workers=1,
                                convert=ConvertConfig(max_side=old["max_side"]),
                                vocabulary=vocabulary)
            assert cfg.params() == old


def test_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_reads_the_same(tmp_path):
    plain = read_dataset(csv_root(tmp_path / "a" / "mydata", ROWS), "csv")
    root = csv_root(tmp_path / "b" / "mydata", ROWS)
    (root / "annotations.csv").write_text("\ufeff" + HEADER + ROWS, encoding="utf-8")
    again = read_dataset(root, "csv")
    assert again.vocabulary == plain.vocabulary and again.problems == plain.problems == []
    assert [(r.image_id, r.split, r.annotations) for r in again.records] == \
           [(r.image_id, r.split, r.annotations) for r in plain.records]
