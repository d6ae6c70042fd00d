"""The report: tables carry the numbers worked out by hand, overlays have red and green box edges where the
boxes are, and TensorBoard receives the scalars and pictures (read back with tensorboard's own reader)."""

from __future__ import annotations

import pytest
from PIL import Image

from litegpt.eval import reference_text
from litegpt.eval.metrics import Prediction, compute_metrics, text_metrics
from litegpt.eval.report import TEXT_BLOCKS, TEXT_COLUMNS, log_tensorboard, scalars, write_report
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR, Vocabulary

SIZE = 200
VINDR = Grammar(VINDR_CXR)
GT = [("Cardiomegaly", (38, 49, 82, 63)), ("Aortic enlargement", (53, 28, 65, 36)),
      ("Pleural effusion", (5, 60, 25, 95))]
SPURIOUS = ("Nodule/Mass", (80, 5, 95, 20))


def entry(label, box) -> str:
    return f"<p>{label}</p> {{<{box[0]}><{box[1]}><{box[2]}><{box[3]}>}}"


def record(image_id, task, output, findings=(), diagnoses=()) -> Prediction:
    target = "Global diseases of this chest radiograph are Pneumonia."
    return Prediction(image_id, task, output, target,
                      [{"label": lab, "box": [v / 100 for v in box]} for lab, box in findings], list(diagnoses))


RECORDS = [
    record("s", "identify", f"Local diseases of this chest radiograph are {entry(*GT[0])},{entry(*SPURIOUS)}.",
           GT, ["Pneumonia"]),
    record("s", "vqa", "Global diseases of this chest radiograph are Pneumonia.", GT, ["Pneumonia"]),
    record("n", "identify", "The chest radiograph shows no findings.", (), ["No finding"]),
    record("n", "vqa", "Global diseases of this chest radiograph are No finding.", (), ["No finding"]),
    record("x", "vqa", "Global diseases of this chest radiograph are No finding. Maybe|not", (), ["Pneumonia"]),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    metrics = compute_metrics(RECORDS, VINDR)
    out = tmp_path_factory.mktemp("eval")
    files = write_report(metrics, RECORDS, out, VINDR, images=lambda image_id: Image.new("L", (SIZE, SIZE), 128))
    return metrics, files


def test_report_tables_hold_the_hand_computed_numbers(written):
    _, files = written
    text = files.report.read_text()
    # Finding: s is found, x is missed (says No finding) -> P 1/1, R 1/2; No finding: P 1/2, R 1/1.
    assert "| reference (authors' rules) | 100.00 | 50.00 | 50.00 | 100.00 | 66.67 | 66.67 |" in text
    # 1 of 3 ground-truth boxes is hit; strictly, 1 of 2 predicted boxes is right.
    assert "| reference: Accuracy (any box, IoU > t, +1 px) | 33.33 | 33.33 | 33.33 |" in text
    assert "| strict: box precision (one-to-one, IoU >= t) | 50.00 | 50.00 | 50.00 |" in text
    assert "| strict: box recall (one-to-one, IoU >= t) | 33.33 | 33.33 | 33.33 |" in text
    assert "| Cardiomegaly | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1 |" in text
    assert "| Nodule/Mass | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0 |" in text
    # Localisation per class: Cardiomegaly found at every threshold, AP 100 (one exact box, one GT box), the
    # Kaggle AP too; the two classes without a box have AP 0, so both mAPs are 1/3.
    assert "| Cardiomegaly | 1 | 1 |" + " 100.00 |" * 11 in text
    assert "| Aortic enlargement | 1 | 0 |" + " 0.00 |" * 3 + " — | 0.00 |" * 3 + " 0.00 | 0.00 |\n" in text
    assert "(COCOeval: 101-point AP, a hit at IoU >= 0.4, classes with ground truth): 33.33%" in text
    assert "Kaggle VinBigData mAP@0.4 (PASCAL VOC 2010 all-point AP, a hit at IoU > 0.4" in text
    assert "compares with that leaderboard): 33.33%" in text
    titles = ("Table 1.", "Table 2.", "Table 3.", "Table 4.", "Table 5.", "Tables 8-10", "Tables 11-13", "Parse rate")
    for title in titles:
        assert title in text
    assert "| vqa | 3 | 2 | 66.67 |" in text  # parse rate
    assert "| `Maybe\\|not` | 1 |" in text  # the fragment, its pipe escaped
    assert "![s](overlays/s.png)" in text
    assert "## Table 1. Finding / No finding" in text and "Labels: the vocabulary 'vindr-cxr' (22 local" in text
    assert "no global diseases" not in text


def test_text_tables_put_the_authors_definitions_beside_ours(written):
    _, files = written
    text = files.report.read_text()
    for task, number in (("identify", 4), ("vqa", 5)):
        records = [r for r in RECORDS if r.task == task]
        targets, outputs = [r.target for r in records], [r.output for r in records]
        for name, block in (("reference", reference_text.text_metrics(targets, outputs)),
                            ("ours", text_metrics(targets, outputs))):
            row = [TEXT_BLOCKS[name], *(f"{100 * block[k]:.2f}" for k in TEXT_COLUMNS), f"{block['cider']:.2f}"]
            assert "| " + " | ".join(row) + " |" in text.split(f"## Table {number}.")[1].split("## ")[0]
    assert "which is how the paper's Tables 4-5 were computed" in text


def test_overlay_has_red_predictions_and_green_truth_at_their_edges(written):
    _, files = written
    assert [p.name for p in files.overlays] == ["s.png"]  # n has no boxes at all, x is a vqa record
    picture = Image.open(files.overlays[0]).convert("RGB")
    px = lambda x, y: picture.getpixel((round(x / 100 * SIZE), round(y / 100 * SIZE)))  # noqa: E731
    label, (x0, y0, x1, y1) = SPURIOUS
    assert px(x0, (y0 + y1) / 2) == (255, 0, 0)  # left edge of the predicted Nodule/Mass box
    label, (x0, y0, x1, y1) = GT[2]
    assert px(x0, (y0 + y1) / 2) == (0, 255, 0)  # left edge of the ground-truth Pleural effusion box
    assert px(50, 90) == (128, 128, 128)  # no box there


def test_tensorboard_gets_scalars_and_overlays(written, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    metrics, files = written
    writer = SummaryWriter(tmp_path)
    log_tensorboard(writer, metrics, step=3, overlays=files.overlays)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    (point,) = events.Scalars("eval/reference/accuracy@0.5")
    assert (point.step, point.value) == (3, pytest.approx(1 / 3))
    (point,) = events.Scalars("eval/strict/box_precision@0.5")
    assert point.value == pytest.approx(1 / 2)
    (point,) = events.Scalars("eval/reference/finding/recall")
    assert point.value == pytest.approx(1 / 2)
    (point,) = events.Scalars("eval/strict/kaggle_map@0.4")
    assert point.value == pytest.approx(1 / 3)
    (point,) = events.Scalars("eval/reference/text/vqa/bleu1")
    assert point.value == pytest.approx(metrics["reference"]["text"]["vqa"]["bleu1"])
    assert events.Tags()["images"] == ["eval/overlay/s"]


def toy_report(tmp_path, vocabulary: Vocabulary) -> tuple[dict, str]:
    """Two images in a non-VinDr grammar: one with a Mass box found exactly, one with nothing."""
    grammar = Grammar(vocabulary)
    nothing = vocabulary.no_finding
    mass = {"findings": [{"label": "Mass", "box": [0.1, 0.1, 0.3, 0.3]}], "diagnoses": []}
    clear = {"findings": [], "diagnoses": [nothing]}
    records = [Prediction(image_id, task, grammar.answer(task, meta), grammar.answer(task, meta), meta["findings"],
                          meta["diagnoses"])
               for image_id, meta in (("m", mass), ("c", clear)) for task in ("identify", "vqa")]
    metrics = compute_metrics(records, grammar, text=False)
    files = write_report(metrics, records, tmp_path, grammar, images=lambda _: Image.new("L", (SIZE, SIZE), 128))
    assert [p.name for p in files.overlays] == ["m.png"]
    return metrics, files.report.read_text()


def test_tables_list_the_vocabularys_labels_and_say_when_it_has_no_diseases(tmp_path):
    metrics, text = toy_report(tmp_path, Vocabulary.build("toy", ["Mass", "Effusion"], []))
    local = text.split("## Local labels")[1].split("## ")[0]
    rows = [line.split(" | ")[0][2:] for line in local.splitlines() if line.startswith("| ")]
    assert rows == ["Label", "Mass", "Effusion", "micro avg", "macro avg", "weighted avg", "samples avg"]
    assert "| Mass | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1 |" in local
    assert "| Effusion | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0 |" in local
    note = ("The vocabulary 'toy' has no global diseases: the global classification (`vqa`) is finding / no-finding "
            "only, its one label 'No finding'.")
    assert text.split("## Table 2.")[1].split("## ")[0].count(note) == 1
    global_ = text.split("## Global labels")[1].split("## ")[0]
    assert note in global_ and "| No finding | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1 |" in global_
    per_class = text.split("## Localisation per local label")[1].split("## ")[0]
    assert "| Mass | 1 | 1 |" + " 100.00 |" * 11 in per_class and "| Effusion | 0 | 0 |" in per_class
    assert "Labels: the vocabulary 'toy' (2 local, 1 global labels)." in text
    assert "Cardiomegaly" not in text  # nothing of VinDr-CXR's


def test_a_vocabularys_own_no_finding_label_heads_table_1_and_scalars_keep_their_names(tmp_path):
    vocabulary = Vocabulary.build("toy-dx", ["Mass"], ["Fibrosis"], no_finding="Normal")
    metrics, text = toy_report(tmp_path, vocabulary)
    assert "## Table 1. Finding / Normal" in text and "F1 Normal (%)" in text and "no global diseases" not in text
    assert "| Fibrosis | 0.00 |" in text.split("## Global labels")[1]
    values = scalars(metrics)
    assert values["strict/no_finding/recall"] == values["strict/finding/precision"] == 1.0  # as VinDr names them
