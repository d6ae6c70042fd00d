"""Evaluation metrics: prediction records in, one JSON-serialisable dict out (paper 4.3 and 4.5).

Two families are reported side by side:

- `reference`: the authors' evaluation code, reproduced on purpose so numbers compare with the paper.
  A class is predicted when its lower-cased name is a substring of the lower-cased output with `<...>`
  tags removed (a short name inside a longer word counts; "no findings" contains the default no-finding
  label, which another vocabulary's no-finding name need not be). Accuracy@t: a ground-truth box
  is a hit when ANY predicted box of its class in its image has IoU > t (strict), with the inclusive
  +1 pixel IoU on 0..100 integers; score = hits / all ground-truth boxes. No one-to-one matching and no
  false-positive penalty, so spamming boxes only helps. Predicted boxes come from the grammar's parser,
  not the authors' regex: the same boxes for well-formed text, but a `<p>A</p> {..},{..}` entry counts
  both boxes and label names are matched case-insensitively.
- `strict`: labels from the grammar's whole-word parser; boxes matched one to one per image and class
  (Hungarian assignment: the most matches, ties broken by total IoU), a match needs continuous IoU >= t,
  the convention of COCO's matcher, so box precision, recall and F1 agree with mAP's notion of a hit.
  mAP@0.4 is pycocotools' COCOeval (101-point interpolated AP per class, averaged over the classes that
  have ground truth, area range 'all', no detection cap). Beside it, `kaggle_map` is the VinBigData Kaggle
  metric (PASCAL VOC 2010 all-point AP, a hit at IoU > 0.4, VOC's matching; see `kaggle_map`), the figure
  that compares with that leaderboard.

Labels are those of a `Grammar`'s vocabulary (the shard set's or the export's): its parser reads the
outputs, per-label rows and mAP classes follow its local and global labels in its order, and the records'
ground truth must use its labels (`Prediction.in_vocabulary`).

Which record feeds what: `identify` records give local-label classification and localisation; `vqa`
records give global-label classification; finding / no-finding (paper Table 1) comes from an image's
`vqa` record when it has one (the paper's Table 1 prompt), else from its `identify` record. Ground-truth
no-finding means the vocabulary's no-finding label is among the image's diagnoses (the label policy puts
it there exactly when the image has neither findings nor diseases). The paper's per-label tables (8-13)
average over the local and the global labels separately (Table 11's support, 3200, is the sum of its six
rows), so the finding column is reported in its own two-class report rather than inside the global one.
A vocabulary without diseases (global labels = [no-finding]) still has a global report: its one row is
the finding / no-finding question asked by `vqa`.

Text metrics (paper Tables 4 and 5) come in two blocks. `text` (ours) scores outputs against targets after
`strip_boxes`; ROUGE via rouge_score on that text (no stemming), BLEU-1..4 (cumulative, corpus), METEOR and
CIDEr-D via pycocoevalcap on lower-case word tokens without punctuation (what coco-caption's PTB tokenizer
yields; METEOR is the Java METEOR 1.5), with references and candidates in their documented roles.
`reference.text` reproduces the authors' definitions (`reference_text`: stemmed ROUGE on nltk sentences,
`<p>` tags kept, 13a-token BLEU, nltk METEOR, CIDEr with the roles swapped); the paper's Tables 4-5 were
computed that way, so it is the block to compare with them.

All rates are fractions in 0..1; CIDEr is on its own scale. Absent inputs give None, never NaN.

`metrics.json` (schema 1), threshold keys written "0.3", "0.4", "0.5":
  counts: records, images, identify, vqa, finding_from {task: images}, box_scores (identify records with them)
  reference.classification / strict.classification: {local, global, finding}, each sklearn's report dict
      (per label and "micro avg", "macro avg", "weighted avg", "samples avg": precision, recall, f1-score,
      support) or None without records
  reference.localisation: accuracy {t}, gt_boxes, per_class {label: support, t}
  strict.localisation: gt_boxes, pred_boxes, thresholds {t: precision, recall, f1, tp},
      per_class {label: gt_boxes, pred_boxes, t: {precision, recall, f1, tp}}
  strict.map: iou, map, per_class {label: AP} (classes with ground truth only)
  strict.kaggle_map: the same keys, VOC 2010 all-point AP at IoU > iou (the VinBigData Kaggle metric)
  text: {identify, vqa}: rouge1, rouge2, rougeL, rougeLsum, bleu1..bleu4, meteor (None plus
      meteor_unavailable when Java cannot run it), cider, count
  reference.text: {identify, vqa}: the same keys under the authors' definitions (meteor None plus
      meteor_unavailable without WordNet)
  parse: {all, identify, vqa}: records, complete (read completely, not empty), empty, rate (complete / records),
      unparsed_fragments, top_unparsed [[text, n]], examples [{image_id, task, unparsed}] (empty outputs: unparsed [])
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from litegpt.boxes import iou_matrix
from litegpt.eval import reference_text
from litegpt.grammar import TASKS, Box, Grammar, quantize_box
from litegpt.labels import Vocabulary

THRESHOLDS = (0.3, 0.4, 0.5)
MAP_IOU = 0.4
FINDING = "Finding"
TOP_UNPARSED = 20


class GroundTruthBox(TypedDict):
    label: str
    box: list[float]  # x_min, y_min, x_max, y_max normalised to 0..1, as in the shard json


@dataclass
class Prediction:
    """One generation for one image and task: a line of `eval/predictions.jsonl`.

    `box_scores` holds one confidence per box that the grammar's `parse(output)` finds, in parse order (see
    `box_confidences`); None means unknown and every box then scores 1.0 for mAP. `token_probs` (the
    probability of each generated token) is kept for analyses such as calibration; no metric reads it.
    A record checks its structure only; its labels are checked against a vocabulary by `in_vocabulary`.
    """

    image_id: str
    task: str
    output: str
    target: str
    gt_findings: list[GroundTruthBox] = field(default_factory=list)
    gt_diagnoses: list[str] = field(default_factory=list)
    token_probs: list[float] | None = None
    box_scores: list[float] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.image_id}: unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        findings: list[GroundTruthBox] = []
        for f in self.gt_findings:
            box = [float(v) for v in f["box"]]
            if len(box) != 4 or not all(math.isfinite(v) for v in box):
                raise ValueError(f"{self.image_id}: ground-truth box {f['box']!r} is not 4 finite numbers")
            if not isinstance(f["label"], str):
                raise ValueError(f"{self.image_id}: ground-truth label {f['label']!r} is not a name")
            findings.append({"label": f["label"], "box": box})
        self.gt_findings = findings
        if not all(isinstance(d, str) for d in self.gt_diagnoses):
            raise ValueError(f"{self.image_id}: ground-truth diagnoses {self.gt_diagnoses!r} are not names")
        self.gt_diagnoses = list(self.gt_diagnoses)

    def in_vocabulary(self, vocabulary: Vocabulary) -> Prediction:
        """This record with its ground-truth labels spelled as `vocabulary` spells them (aliases and case
        resolved); a ValueError naming the image and the label when one is not in it or not of its kind:
        findings take local labels, diagnoses global ones."""
        def canonical(name: str, what: str, kind: str, allowed: Sequence[str]) -> str:
            try:
                label = vocabulary.canonical(name)
            except ValueError as exc:
                raise ValueError(f"{self.image_id}: ground-truth {what}: {exc}") from None
            if label not in allowed:
                raise ValueError(f"{self.image_id}: ground-truth {what} {label!r} is not one of the {kind} labels "
                                 f"of {vocabulary.name}: {', '.join(allowed)}")
            return label

        findings = [{"label": canonical(f["label"], "finding", "local", vocabulary.local_labels), "box": f["box"]}
                    for f in self.gt_findings]
        diagnoses = [canonical(d, "diagnosis", "global", vocabulary.global_labels) for d in self.gt_diagnoses]
        return replace(self, gt_findings=findings, gt_diagnoses=diagnoses)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Prediction:
        data = json.loads(line)
        missing = {"image_id", "task", "output", "target"} - set(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if missing or unknown:
            raise ValueError(f"prediction record: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        return cls(**data)


def write_predictions(path: Path, predictions: Iterable[Prediction]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(p.to_json() + "\n" for p in predictions)


def read_predictions(path: Path) -> list[Prediction]:
    with open(path, encoding="utf-8") as f:
        out = []
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(Prediction.from_json(line))
                except (ValueError, TypeError, KeyError) as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from exc
        return out


def box_confidences(
    box_spans: Sequence[tuple[int, int]],
    token_probs: Sequence[float],
    token_offsets: Sequence[tuple[int, int]],
) -> list[float]:
    """Confidence of each box: the mean probability of the generated tokens that overlap its text.

    `box_spans` are the character spans of the boxes' `{<..><..><..><..>}` text in the output, in parse
    order; `token_offsets` the character span of every generated token in the same decoded text (a fast
    tokenizer's offset mapping) and `token_probs` the probability the model gave each chosen token. The
    mean, not the product, so a box written with more tokens (three-digit coordinates) is not penalised.
    """
    if len(token_probs) != len(token_offsets):
        raise ValueError(f"{len(token_probs)} token probabilities for {len(token_offsets)} token offsets")
    scores = []
    for start, end in box_spans:
        probs = [p for p, (s, e) in zip(token_probs, token_offsets) if s < end and e > start]
        if not probs:
            raise ValueError(f"no generated token overlaps the box text at characters {start}..{end}")
        scores.append(float(np.mean(probs)))
    return scores


# ---- labels -----------------------------------------------------------------------------------------

_TAG = re.compile(r"<.*?>")


def reference_labels(text: str, names: Sequence[str]) -> set[str]:
    """The authors' rule: a name is predicted if it is a substring of the lower-cased, tag-free text."""
    plain = _TAG.sub("", text.lower())
    return {name for name in names if name.lower() in plain}


def strict_labels(text: str, names: Sequence[str], grammar: Grammar) -> set[str]:
    """Labels the grammar finds as whole words, restricted to `names`."""
    return set(grammar.parse(text).labels) & set(names)


def _plain(value: Any) -> Any:
    """A nested dict with numpy scalars -> JSON-native Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def classification(truth: Sequence[set[str]], predicted: Sequence[set[str]], names: Sequence[str]) -> dict:
    """scikit-learn's classification_report on multilabel indicator matrices, as a dict.

    zero_division=0 gives the values of sklearn's default ('warn') without the warnings. The matrices carry one
    more column, a label no row has and `labels` leaves out of every figure: sklearn would read a single label's
    one column (a vocabulary without diseases has one global label) as a binary target and report its zeros.
    """
    from sklearn.metrics import classification_report

    def indicator(rows: Sequence[set[str]]) -> np.ndarray:
        return np.array([[name in row for name in names] + [False] for row in rows],
                        dtype=int).reshape(-1, len(names) + 1)

    report = classification_report(
        indicator(truth), indicator(predicted), labels=list(range(len(names))), target_names=list(names),
        output_dict=True, zero_division=0,
    )
    return _plain(report)


def finding_names(vocabulary: Vocabulary) -> tuple[str, str]:
    """The two classes of the finding / no-finding report (paper Table 1): any finding, or the no-finding label."""
    if vocabulary.no_finding == FINDING:
        raise ValueError(f"vocabulary {vocabulary.name}: the no-finding label cannot be called {FINDING!r}, "
                         "the name of its opposite class in the finding / no-finding report")
    return FINDING, vocabulary.no_finding


def _classification_family(
    by_task: dict[str, list[Prediction]], finding_source: list[Prediction], grammar: Grammar, strict: bool
) -> dict:
    def extract(text: str, names: Sequence[str]) -> set[str]:
        return strict_labels(text, names, grammar) if strict else reference_labels(text, names)

    vocabulary = grammar.vocabulary
    out: dict[str, Any] = {}
    for scope, task, names in (("local", "identify", vocabulary.local_labels),
                               ("global", "vqa", vocabulary.global_labels)):
        records = by_task[task]
        if not records:
            out[scope] = None
            continue
        truth = [{f["label"] for f in r.gt_findings} if task == "identify" else set(r.gt_diagnoses) for r in records]
        out[scope] = classification(truth, [extract(r.output, names) for r in records], names)
    finding, no_finding = names = finding_names(vocabulary)

    def row(nothing: bool) -> set[str]:
        return {no_finding} if nothing else {finding}

    truth = [row(no_finding in r.gt_diagnoses) for r in finding_source]
    predicted = [row(no_finding in extract(r.output, [no_finding])) for r in finding_source]
    out["finding"] = classification(truth, predicted, names) if finding_source else None
    return out


# ---- boxes ------------------------------------------------------------------------------------------

@dataclass
class _ImageBoxes:
    """Boxes of one `identify` record, per local label, in 0..100 integers; scores align with `pred`."""

    gt: dict[str, list[Box]]
    pred: dict[str, list[Box]]
    scores: dict[str, list[float]]


def _image_boxes(record: Prediction, grammar: Grammar) -> _ImageBoxes:
    findings = grammar.parse(record.output).findings  # local labels only
    scores = record.box_scores if record.box_scores is not None else [1.0] * len(findings)
    if len(scores) != len(findings):
        raise ValueError(
            f"{record.image_id}: {len(scores)} box_scores for {len(findings)} parsed boxes in the output"
        )
    out = _ImageBoxes({}, {}, {})
    for f in record.gt_findings:
        out.gt.setdefault(f["label"], []).append(quantize_box(f["box"]))
    for (label, box), score in zip(findings, scores):
        out.pred.setdefault(label, []).append(box)
        out.scores.setdefault(label, []).append(float(score))
    return out


def iou_inclusive(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """Pairwise IoU of integer boxes counting both end pixels (width = x1 - x0 + 1), as the authors do:
    the continuous IoU of the boxes grown by one at their max edges."""
    grow = np.array([0, 0, 1, 1])
    return iou_matrix(np.reshape(a, (-1, 4)) + grow, np.reshape(b, (-1, 4)) + grow)


def _key(t: float) -> str:
    return f"{t:g}"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def reference_accuracy(images: Sequence[_ImageBoxes], labels: Sequence[str], thresholds: Sequence[float]) -> dict:
    """Accuracy@t as the authors code it: hits (any same-class box with inclusive IoU > t) / GT boxes;
    per class for each of `labels` (the local labels)."""
    hits = {label: Counter() for label in labels}
    support: Counter = Counter()
    for im in images:
        for label, gt in im.gt.items():
            support[label] += len(gt)
            if label not in im.pred:
                continue
            best = iou_inclusive(gt, im.pred[label]).max(axis=1)
            for t in thresholds:
                hits[label][_key(t)] += int((best > t).sum())
    total = sum(support.values())
    return {
        "accuracy": {_key(t): _ratio(sum(h[_key(t)] for h in hits.values()), total) for t in thresholds},
        "gt_boxes": total,
        "per_class": {
            label: {
                "support": support[label],
                **{_key(t): _ratio(hits[label][_key(t)], support[label]) for t in thresholds},
            }
            for label in labels
        },
    }


def matched_pairs(gt: Sequence[Box], pred: Sequence[Box], threshold: float) -> int:
    """Size of a one-to-one matching with IoU >= threshold: the most matches, ties broken by total IoU.

    Each valid pair weighs (min(n, m) + 1) + IoU, so one more match always outweighs any IoU gain.
    """
    from scipy.optimize import linear_sum_assignment

    if not gt or not pred:
        return 0
    iou = iou_matrix(gt, pred)
    valid = iou >= threshold
    weight = np.where(valid, iou + min(len(gt), len(pred)) + 1, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return int(valid[rows, cols].sum())


def _prf(tp: int, n_pred: int, n_gt: int) -> dict:
    """F1 = 2TP / (predicted + ground truth): 0, not undefined, when only one side has boxes."""
    f1 = _ratio(2 * tp, n_pred + n_gt)
    return {"precision": _ratio(tp, n_pred), "recall": _ratio(tp, n_gt), "f1": f1, "tp": tp}


def strict_boxes(images: Sequence[_ImageBoxes], labels: Sequence[str], thresholds: Sequence[float]) -> dict:
    """One-to-one box precision / recall / F1 per threshold, overall (micro) and per class of `labels`.

    Per-class recall is the strict Accuracy@IoU: matched ground-truth boxes / ground-truth boxes.
    """
    tp = {label: Counter() for label in labels}
    n_gt: Counter = Counter()
    n_pred: Counter = Counter()
    for im in images:
        for label in set(im.gt) | set(im.pred):
            gt, pred = im.gt.get(label, []), im.pred.get(label, [])
            n_gt[label] += len(gt)
            n_pred[label] += len(pred)
            for t in thresholds:
                tp[label][_key(t)] += matched_pairs(gt, pred, t)
    total_gt, total_pred = sum(n_gt.values()), sum(n_pred.values())
    return {
        "gt_boxes": total_gt,
        "pred_boxes": total_pred,
        "thresholds": {
            _key(t): _prf(sum(c[_key(t)] for c in tp.values()), total_pred, total_gt) for t in thresholds
        },
        "per_class": {
            label: {
                "gt_boxes": n_gt[label],
                "pred_boxes": n_pred[label],
                **{_key(t): _prf(tp[label][_key(t)], n_pred[label], n_gt[label]) for t in thresholds},
            }
            for label in labels
        },
    }


def _xywh(b: Box) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def _coco_annotations(images: Sequence[_ImageBoxes], cat: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """Ground-truth annotations and detections in COCO's json form; image ids count from 1."""
    gt_anns, dets = [], []
    for img_id, im in enumerate(images, 1):
        for label, boxes in im.gt.items():
            for b in boxes:
                w = _xywh(b)
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": img_id, "category_id": cat[label],
                                "bbox": w, "area": w[2] * w[3], "iscrowd": 0})
        for label, boxes in im.pred.items():
            for b, s in zip(boxes, im.scores[label]):
                dets.append({"image_id": img_id, "category_id": cat[label], "bbox": _xywh(b), "score": s})
    return gt_anns, dets


def coco_map(images: Sequence[_ImageBoxes], labels: Sequence[str], iou: float = MAP_IOU) -> dict:
    """Per-class AP at one IoU threshold with pycocotools' COCOeval; mAP over classes with ground truth.
    `labels` are the categories (the local labels), in order.

    Boxes go in as 0..100 xywh. COCO's matcher accepts IoU >= iou, greedily by descending score; the
    area range is 'all' and maxDets is set to the largest number of boxes in any image, so nothing is
    cut. Annotation ids start at 1 because COCOeval reads a matched id of 0 as "unmatched". COCO's
    101-point AP, not the VinBigData Kaggle metric (see the module doc).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat = {label: i + 1 for i, label in enumerate(labels)}
    gt_anns, dets = _coco_annotations(images, cat)
    present = sorted({a["category_id"] for a in gt_anns})
    if not present:
        return {"iou": iou, "map": None, "per_class": {}}
    if not dets:  # loadRes cannot take an empty list; every class with ground truth then has AP 0
        return {"iou": iou, "map": 0.0, "per_class": {labels[c - 1]: 0.0 for c in present}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": i} for i in range(1, len(images) + 1)],
                           "categories": [{"id": c, "name": n} for n, c in cat.items()], "annotations": gt_anns}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [max(sum(len(b) for b in im.pred.values()) for im in images)]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, 0]  # recall thresholds x categories
    per_class = {}
    for k, c in enumerate(ev.params.catIds):
        if c in present:
            per_class[labels[c - 1]] = float(precision[:, k].mean())
    return {"iou": iou, "map": float(np.mean(list(per_class.values()))), "per_class": per_class}


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """PASCAL VOC 2010+ AP: area under the precision envelope (each precision raised to the best at any
    higher recall), summed over every recall step; no 11- or 101-point sampling."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def kaggle_map(images: Sequence[_ImageBoxes], labels: Sequence[str], iou: float = MAP_IOU) -> dict:
    """The VinBigData Kaggle metric: VOC 2010 all-point AP with a hit at IoU > iou, mean over the classes of
    `labels` (the local labels) with ground truth.

    Per class, detections of all images in descending score (ties in record, then parse, order) are matched
    the VOC devkit's way: each goes to the ground-truth box of its image it overlaps most (continuous IoU);
    a hit if that IoU is strictly above `iou` and the box is not taken yet, else a false positive, even when
    another free box overlaps enough (COCO would take that one, and accepts IoU == iou).
    """
    per_class = {}
    for label in labels:
        n_gt = sum(len(im.gt.get(label, ())) for im in images)
        if not n_gt:
            continue
        detections = sorted(
            ((score, k, box) for k, im in enumerate(images)
             for box, score in zip(im.pred.get(label, ()), im.scores.get(label, ()))),
            key=lambda d: -d[0],
        )
        taken = {k: np.zeros(len(im.gt.get(label, ())), dtype=bool) for k, im in enumerate(images)}
        hits = np.zeros(len(detections))
        for i, (_, k, box) in enumerate(detections):
            gt = images[k].gt.get(label, [])
            if gt:
                overlaps = iou_matrix([box], gt)[0]
                best = int(overlaps.argmax())
                if overlaps[best] > iou and not taken[k][best]:
                    taken[k][best] = hits[i] = True
        tp = np.cumsum(hits)
        per_class[label] = voc_ap(tp / n_gt, tp / np.arange(1, len(hits) + 1))
    mean_ap = float(np.mean(list(per_class.values()))) if per_class else None
    return {"iou": iou, "map": mean_ap, "per_class": per_class}


# ---- text -------------------------------------------------------------------------------------------

_BOX_TEXT = re.compile(r"\{\s*<[^{}]*\}")
_ENTRY_TAGS = re.compile(r"</?p>|<delim>", re.IGNORECASE)
_WORD = re.compile(r"\w+(?:/\w+)*")


def strip_boxes(text: str) -> str:
    """Text without box groups `{<..>..}` and `<p>`/`</p>`/`<delim>` tags, whitespace collapsed (paper 4.3)."""
    return " ".join(_ENTRY_TAGS.sub(" ", _BOX_TEXT.sub(" ", text)).split())


def caption_words(text: str) -> str:
    """Lower-case words joined by spaces, punctuation dropped: the input BLEU, METEOR and CIDEr expect."""
    return " ".join(_WORD.findall(text.lower()))


@functools.cache
def meteor_scorer() -> Any:
    """One METEOR JVM per process (it takes seconds to start); raises if Java cannot run it."""
    if shutil.which("java") is None:
        raise RuntimeError("METEOR needs Java (pycocoevalcap runs meteor-1.5.jar); `java` is not on PATH")
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float | None, str | None]:
    """METEOR, or None and the reason; a JVM that failed is dropped and the next call starts a new one."""
    try:
        scorer = meteor_scorer()
    except (RuntimeError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        return float(scorer.compute_score(gts, res)[0]), None
    except (OSError, ValueError) as exc:
        # pycocoevalcap keeps its lock when the JVM fails mid-call, and its __del__ would then wait forever
        # (or raise on the broken pipe): release the lock and close the pipe here.
        if scorer.lock.locked():
            scorer.lock.release()
        with contextlib.suppress(OSError):
            scorer.meteor_p.stdin.close()
        meteor_scorer.cache_clear()
        return None, f"METEOR failed ({type(exc).__name__}: {exc})"


def text_metrics(references: Sequence[str], candidates: Sequence[str]) -> dict:
    """ROUGE-1/2/L/Lsum (mean F), corpus BLEU-1..4, METEOR, CIDEr-D of candidates against references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    if len(references) != len(candidates) or not references:
        raise ValueError(f"text metrics need matching, non-empty lists ({len(references)} vs {len(candidates)})")
    refs = [strip_boxes(t) for t in references]
    cands = [strip_boxes(t) for t in candidates]
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds))
    rouge = [scorer.score(r, c) for r, c in zip(refs, cands)]
    out: dict[str, Any] = {k: float(np.mean([s[k].fmeasure for s in rouge])) for k in kinds}
    gts = {i: [caption_words(r)] for i, r in enumerate(refs)}
    res = {i: [caption_words(c)] for i, c in enumerate(cands)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{n}": float(b) for n, b in enumerate(bleu, 1)})
    out["meteor"], error = _meteor(gts, res)
    if error:
        out["meteor_unavailable"] = error
    # CIDEr's idf comes from the references; with no reference words at all it is undefined.
    out["cider"] = float(Cider().compute_score(gts, res)[0]) if any(g[0] for g in gts.values()) else None
    out["count"] = len(refs)
    return out


# ---- parse rate -------------------------------------------------------------------------------------

def parse_stats(records: Sequence[Prediction], grammar: Grammar, top: int = TOP_UNPARSED) -> dict:
    """Share of outputs the grammar reads completely, and the most frequent fragments it could not read.

    An empty (or blank) output is not parsed: it holds no answer (a model with NaN weights gives nothing
    else), so it counts against the rate; it has no fragment, and is listed in `examples` with `unparsed: []`.
    """
    fragments: Counter = Counter()
    failed = []
    for r in records:
        unparsed = grammar.parse(r.output).unparsed
        fragments.update(unparsed)
        if unparsed or not r.output.strip():
            failed.append({"image_id": r.image_id, "task": r.task, "unparsed": unparsed})
    return {
        "records": len(records),
        "complete": len(records) - len(failed),
        "empty": sum(not r.output.strip() for r in records),  # counted as not parsed
        "rate": _ratio(len(records) - len(failed), len(records)),
        "unparsed_fragments": sum(fragments.values()),
        "top_unparsed": [[text, n] for text, n in fragments.most_common(top)],
        "examples": failed[:top],
    }


# ---- everything -------------------------------------------------------------------------------------

TextScore = Callable[[Sequence[str], Sequence[str]], dict]


def _text_block(by_task: dict[str, list[Prediction]], score: TextScore) -> dict:
    """`score(targets, outputs)` per task; None for a task without records."""
    return {t: score([r.target for r in rs], [r.output for r in rs]) if rs else None for t, rs in by_task.items()}


def compute_metrics(predictions: Sequence[Prediction], grammar: Grammar, thresholds: Sequence[float] = THRESHOLDS,
                    text: bool = True) -> dict:
    """All metrics of an evaluation run: the content of `metrics.json` (schema in the module doc).

    `grammar` is the dataset's (the export's, which evaluate checks equals the shard set's): it parses the
    outputs, and its vocabulary gives the labels, whose names the ground truth must use. `text=False` leaves
    both text-metric blocks empty (None per task): validation during training reports no text metric, and
    METEOR's Java start-up and WordNet's loading would cost it seconds."""
    if not predictions:
        raise ValueError("no prediction records to evaluate")
    vocabulary = grammar.vocabulary
    predictions = [p.in_vocabulary(vocabulary) for p in predictions]
    by_task: dict[str, list[Prediction]] = {t: [] for t in TASKS}
    seen: dict[str, dict[str, Prediction]] = {}
    for p in predictions:
        if p.task in seen.setdefault(p.image_id, {}):
            raise ValueError(f"two {p.task!r} records for image {p.image_id!r}")
        seen[p.image_id][p.task] = p
        by_task[p.task].append(p)
    finding_source = [tasks.get("vqa") or tasks["identify"] for tasks in seen.values()]
    images = [_image_boxes(r, grammar) for r in by_task["identify"]]
    localisation = bool(images)
    local = vocabulary.local_labels
    return {
        "schema": 1,
        "counts": {
            "records": len(predictions),
            "images": len(seen),
            **{t: len(by_task[t]) for t in TASKS},
            "finding_from": dict(Counter(r.task for r in finding_source)),
            "box_scores": sum(r.box_scores is not None for r in by_task["identify"]),
        },
        "thresholds": [_key(t) for t in thresholds],
        "reference": {
            "classification": _classification_family(by_task, finding_source, grammar, strict=False),
            "localisation": reference_accuracy(images, local, thresholds) if localisation else None,
            "text": _text_block(by_task, reference_text.text_metrics) if text else dict.fromkeys(by_task),
        },
        "strict": {
            "classification": _classification_family(by_task, finding_source, grammar, strict=True),
            "localisation": strict_boxes(images, local, thresholds) if localisation else None,
            "map": coco_map(images, local) if localisation else None,
            "kaggle_map": kaggle_map(images, local) if localisation else None,
        },
        "text": _text_block(by_task, text_metrics) if text else dict.fromkeys(by_task),
        "parse": {"all": parse_stats(predictions, grammar),
                  **{t: parse_stats(rs, grammar) for t, rs in by_task.items()}},
    }
