"""`litegpt predict` on a real chest radiograph (pydicom's RG1_UNCR.dcm, 1841 x 1955) with a real tiny export.

The random model writes no parseable box, so the geometry test replaces the generated text (only) with a
known answer written in the tiny tokenizer's tokens and checks pixel boxes and confidences by hand; so does
the test of an export trained on another label vocabulary than VinDr-CXR's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from litegpt.cli import main
from litegpt.data.inspection import label_colour
from litegpt.eval import predict
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR, Vocabulary
from litegpt.model.config import Visual
from litegpt.model.export import save_export
from litegpt.model.model import Generation

RADIOGRAPH = Path(get_testdata_file("RG1_UNCR.dcm", download=False))
COLS, ROWS = 1841, 1955
KEYS = {"file", "findings", "diagnoses", "text", "unparsed", "overlay"}


@pytest.fixture(scope="module")
def stage(tiny_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("run") / "stage2"
    save_export(tiny_model, directory / "export", {"stage": "stage2", "step": 3, "tasks": ["vqa"]})
    return directory


def run_predict(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_on_a_real_dicom_prints_json_and_writes_an_overlay(stage, tmp_path, capsys):
    overlay = tmp_path / "overlay.png"
    code, out, _ = run_predict(capsys, str(RADIOGRAPH), "--run", str(stage), "--out", str(overlay),
                               "--task", "both", "--max-new-tokens", "32")
    assert code == 0
    result = json.loads(out)  # stdout holds the JSON and nothing else
    assert set(result) == KEYS
    assert set(result["text"]) == {"identify", "vqa"} and all(isinstance(t, str) for t in result["text"].values())
    for finding in result["findings"]:
        x0, y0, x1, y1 = finding["box_px"]
        assert 0 <= x0 <= x1 <= COLS and 0 <= y0 <= y1 <= ROWS
    assert result["overlay"] == str(overlay)
    with Image.open(overlay) as picture:
        assert picture.format == "PNG" and max(picture.size) == 1024  # prepare's conversion: longer side 1024


def test_default_tasks_and_overlay_path_follow_the_stage_and_the_input(stage, tmp_path, capsys):
    source = tmp_path / "chest.png"
    Image.fromarray(np.full((90, 120), 100, dtype=np.uint8)).save(source)
    code, out, _ = run_predict(capsys, str(source), "--run", str(stage), "--max-new-tokens", "8")
    assert code == 0
    result = json.loads(out)
    assert set(result["text"]) == {"vqa"}  # the stage's tasks
    assert result["overlay"] == str(tmp_path / "chest.overlay.png")
    with Image.open(result["overlay"]) as picture:
        assert picture.size == (120, 90)


def test_boxes_come_back_in_original_pixels_with_their_confidence(stage, tmp_path, capsys, monkeypatch, tiny_model):
    box = "{<10><20><50><80>}"
    text = f"Local diseases of this chest radiograph are <p>Cardiomegaly</p> {box}."
    tokenizer = tiny_model.tokenizer
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    probs = [0.5 + i / (4 * len(ids)) for i in range(len(ids))]

    def fake_generate(model, stage, task, keys, visual, source, decoding, chunk):
        assert source is Visual.LIVE and set(visual[0]) == set(model.encoder_names)  # live encoder inputs
        return [Generation(text, ids, tokenizer.convert_ids_to_tokens(ids), probs)]

    monkeypatch.setattr(predict.inference, "generate", fake_generate)
    overlay = tmp_path / "boxes.png"
    code, out, _ = run_predict(capsys, str(RADIOGRAPH), "--run", str(stage), "--task", "identify",
                               "--out", str(overlay))
    assert code == 0
    (finding,) = json.loads(out)["findings"]
    assert finding["label"] == "Cardiomegaly"
    assert finding["box_norm"] == [0.1, 0.2, 0.5, 0.8]
    assert finding["box_px"] == [round(0.1 * COLS), round(0.2 * ROWS), round(0.5 * COLS), round(0.8 * ROWS)]
    start = text.index(box)
    covering = [p for p, (s, e) in zip(probs, offsets) if s < start + len(box) and e > start]
    assert finding["confidence"] == pytest.approx(sum(covering) / len(covering))
    with Image.open(overlay) as picture:
        w, h = picture.size
        colour = label_colour("Cardiomegaly", VINDR_CXR.local_labels)  # the export's vocabulary colours the boxes
        assert colour != label_colour("Cardiomegaly")
        assert picture.convert("RGB").getpixel((round(0.1 * w), round(0.5 * h))) == colour


def test_unreadable_input_fails_with_one_message_naming_the_file(stage, tmp_path, capsys):
    fake = tmp_path / "notes.dcm"
    fake.write_text("this is not a DICOM file\n")
    code, out, err = run_predict(capsys, str(fake), "--run", str(stage))
    assert code == 1 and out == ""
    assert str(fake) in err and len(err.strip().splitlines()) == 1
    code, _, err = run_predict(capsys, str(tmp_path / "missing.dcm"), "--run", str(stage))
    assert code == 1 and "missing.dcm: no such file" in err


def test_a_dicom_claiming_too_many_pixels_is_refused_before_decoding(stage, tmp_path, capsys):
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm", download=False))  # a real 64 x 64 RLE file
    ds.Rows = ds.Columns = 20000  # the RLE decoder would allocate 800 MB for this claim
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb)
    code, out, err = run_predict(capsys, str(bomb), "--run", str(stage))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(bomb) in err and "20000 x 20000" in err
    # the limit is the flag's: the real radiograph is refused one pixel below its size, and 0 is no limit at all
    code, out, err = run_predict(capsys, str(RADIOGRAPH), "--run", str(stage), "--max-pixels", str(ROWS * COLS - 1))
    assert code == 1 and out == "" and f"{ROWS} x {COLS}" in err
    code, out, err = run_predict(capsys, str(RADIOGRAPH), "--run", str(stage), "--max-pixels", "0")
    assert code == 2 and out == "" and "--max-pixels must be >= 1" in err


def test_labels_are_the_exports_vocabularys(tiny_model, tmp_path, capsys, monkeypatch):
    """An export trained on another vocabulary: its grammar reads the text, diagnoses come in its order, and a
    label it does not have (VinDr-CXR's Cardiomegaly) is no finding."""
    grammar = Grammar(Vocabulary.build("toy", ["Mass", "Effusion"], ["Fibrosis", "Hernia"], no_finding="Normal"))
    stage = tmp_path / "toy" / "stage2"
    save_export(tiny_model, stage / "export", {"stage": "stage2", "step": 3, "tasks": ["identify", "vqa"],
                                               **grammar.to_dict()})
    texts = {"identify": f"{grammar.template.local_prefix} <p>Mass</p> {{<10><20><50><80>}},"
                         "<p>Cardiomegaly</p> {<1><2><3><4>}.",
             "vqa": f"{grammar.template.global_prefix} Hernia, Fibrosis."}
    prompts = []

    def fake_generate(model, stage, task, keys, visual, source, decoding, chunk):
        prompts.append(stage.prompt(task))
        ids = model.tokenizer(texts[task], add_special_tokens=False)["input_ids"]
        return [Generation(texts[task], ids, model.tokenizer.convert_ids_to_tokens(ids), [0.5] * len(ids))]

    monkeypatch.setattr(predict.inference, "generate", fake_generate)
    code, out, _ = run_predict(capsys, str(RADIOGRAPH), "--run", str(stage), "--out", str(tmp_path / "o.png"))
    assert code == 0
    result = json.loads(out)
    assert [f["label"] for f in result["findings"]] == ["Mass"]
    assert result["diagnoses"] == ["Fibrosis", "Hernia"]  # in the vocabulary's order, not the text's
    assert {"task": "identify", "fragment": "<p>Cardiomegaly</p> {<1><2><3><4>}"} in result["unparsed"]
    assert prompts[1] == grammar.prompt("vqa") and "Fibrosis, Hernia, or Normal?" in prompts[1]
