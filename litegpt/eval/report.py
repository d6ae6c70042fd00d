"""The evaluation report: the paper's tables filled from `metrics.compute_metrics`, box overlays, TensorBoard.

Every table puts the authors' definitions (`reference`, comparable with the paper) next to the stricter
ones (`strict`), so a reader sees how much of a number comes from the metric rather than the model.
The per-label tables list the labels of the grammar's vocabulary, the one the metrics were computed with.
Overlays follow the paper's Figure 3: predicted boxes red, ground truth green, each with its label.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from litegpt.data.inspection import draw_boxes
from litegpt.eval.metrics import Prediction, finding_names
from litegpt.grammar import Grammar
from litegpt.labels import Vocabulary

PREDICTED_COLOUR = (255, 0, 0)
TRUTH_COLOUR = (0, 255, 0)
OVERLAYS = 8
FAMILIES = {"reference": "reference (authors' rules)", "strict": "strict"}
AVERAGES = ("micro avg", "macro avg", "weighted avg", "samples avg")
FINDING_SLUGS = ("finding", "no_finding")  # the finding report's scalars, whatever the no-finding label is called
TEXT_BLOCKS = {
    "reference": "reference (authors' definitions, as the paper's Tables 4-5)",
    "ours": "ours (PTB-style words, no stemming, Java METEOR)",
}
TEXT_COLUMNS = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-LSUM", "bleu1": "BLEU-1",
    "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
}


class ReportFiles(NamedTuple):
    report: Path
    overlays: list[Path]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _cell(value: Any) -> str:
    """One line, pipes escaped: generated text in a cell must not break the table."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _report(metrics: dict, family: str, scope: str) -> dict | None:
    return metrics[family]["classification"][scope]


def _no_diseases(vocabulary: Vocabulary) -> list[str]:
    """A note for a vocabulary whose only global label is the no-finding one."""
    if vocabulary.diseases:
        return []
    return [f"The vocabulary {vocabulary.name!r} has no global diseases: the global classification (`vqa`) is "
            f"finding / no-finding only, its one label {vocabulary.no_finding!r}.", ""]


def _table1(metrics: dict, names: Sequence[str]) -> list[str]:
    header = ["Metrics", *(f"{m} {n} (%)" for m in ("Precision", "Recall", "F1") for n in names)]
    rows = []
    for family, title in FAMILIES.items():
        report = _report(metrics, family, "finding")
        if report is not None:
            keys = ("precision", "recall", "f1-score")
            rows.append([title, *(_pct(report[n][k]) for k in keys for n in names)])
    return [f"## Table 1. {' / '.join(names)}", "", *_table(header, rows)]


def _table2(metrics: dict, vocabulary: Vocabulary) -> list[str]:
    header = ["Metrics", "Labels", *(f"F1 {a} (%)" for a in AVERAGES)]
    rows = []
    for family, title in FAMILIES.items():
        for scope in ("global", "local"):
            report = _report(metrics, family, scope)
            if report is not None:
                rows.append([title, scope, *(_pct(report[a]["f1-score"]) for a in AVERAGES)])
    return [
        "## Table 2. Classification F1",
        "",
        "The paper reports one F1 (60% for its best model) without saying which average; all four are given.",
        "",
        *_no_diseases(vocabulary),
        *_table(header, rows),
    ]


def _table3(metrics: dict) -> list[str]:
    ref, strict = metrics["reference"]["localisation"], metrics["strict"]["localisation"]
    if ref is None:
        return ["## Table 3. Localisation", "", "No `identify` records.", ""]
    ts = metrics["thresholds"]
    rows = [["reference: Accuracy (any box, IoU > t, +1 px)", *(_pct(ref["accuracy"][t]) for t in ts)]]
    rows += [
        [f"strict: box {k} (one-to-one, IoU >= t)", *(_pct(strict["thresholds"][t][k]) for t in ts)]
        for k in ("recall", "precision", "f1")
    ]
    scores, mean_ap, kaggle = metrics["counts"]["box_scores"], metrics["strict"]["map"], metrics["strict"]["kaggle_map"]
    return [
        "## Table 3. Localisation",
        "",
        f"{ref['gt_boxes']} ground-truth boxes, {strict['pred_boxes']} predicted boxes.",
        "",
        *_table(["Metrics", *(f"@{t} (%)" for t in ts)], rows),
        (f"mAP@{mean_ap['iou']:g} (COCOeval: 101-point AP, a hit at IoU >= {mean_ap['iou']:g}, classes with ground "
         f"truth): {_pct(mean_ap['map'])}%. Kaggle VinBigData mAP@{kaggle['iou']:g} (PASCAL VOC 2010 all-point "
         f"AP, a hit at IoU > {kaggle['iou']:g}, the same classes; compares with that leaderboard): "
         f"{_pct(kaggle['map'])}%. Box confidences from `box_scores` in {scores} of "
         f"{metrics['counts']['identify']} records (1.0 where absent)."),
        "",
    ]


def _text_blocks(metrics: dict, task: str) -> dict[str, dict | None]:
    """The two text blocks of a task: the authors' definitions first, then ours."""
    return {"reference": metrics["reference"]["text"][task], "ours": metrics["text"][task]}


def _text_table(metrics: dict, task: str, number: int, title: str) -> list[str]:
    blocks = _text_blocks(metrics, task)
    if blocks["ours"] is None:
        return [f"## Table {number}. Text validity, {title}", "", f"No `{task}` records.", ""]
    rows = [[TEXT_BLOCKS[name], *(_pct(text[k]) for k in TEXT_COLUMNS),
             "—" if text["cider"] is None else f"{text['cider']:.2f}"] for name, text in blocks.items()]
    lines = [f"## Table {number}. Text validity, {title} ({blocks['ours']['count']} outputs)", ""]
    lines += _table(["Definitions", *(f"{name} (%)" for name in TEXT_COLUMNS.values()), "CIDEr"], rows)
    notes = [f"METEOR unavailable ({name}): {text['meteor_unavailable']}"
             for name, text in blocks.items() if "meteor_unavailable" in text]
    return lines + notes + ([""] if notes else [])


def _per_label_table(metrics: dict, scope: str, names: Sequence[str], title: str,
                     note: Sequence[str] = ()) -> list[str]:
    reports = {family: _report(metrics, family, scope) for family in FAMILIES}
    if reports["reference"] is None:
        return [f"## {title}", "", "No records.", ""]
    keys = ("precision", "recall", "f1-score")
    header = ["Label", *(f"{f} {k}" for f in ("ref", "strict") for k in ("P", "R", "F1")), "Support"]
    rows = [
        [row, *(f"{reports[f][row][k]:.2f}" for f in FAMILIES for k in keys), int(reports["reference"][row]["support"])]
        for row in (*names, *AVERAGES)
    ]
    return [f"## {title}", "", *note, *_table(header, rows)]


def _localisation_per_class(metrics: dict, labels: Sequence[str]) -> list[str]:
    ref, strict, ap = metrics["reference"]["localisation"], metrics["strict"]["localisation"], metrics["strict"]["map"]
    if ref is None:
        return []
    kaggle = metrics["strict"]["kaggle_map"]
    ts = metrics["thresholds"]
    header = ["Label", "GT boxes", "Predicted", *(f"ref Acc@{t}" for t in ts),
              *(f"strict {k}@{t}" for t in ts for k in ("P", "R")), f"AP@{ap['iou']:g}",
              f"Kaggle AP@{kaggle['iou']:g}"]
    rows = []
    for label in labels:
        s = strict["per_class"][label]
        rows.append([
            label, s["gt_boxes"], s["pred_boxes"], *(_pct(ref["per_class"][label][t]) for t in ts),
            *(_pct(s[t][k]) for t in ts for k in ("precision", "recall")), _pct(ap["per_class"].get(label)),
            _pct(kaggle["per_class"].get(label)),
        ])
    return ["## Localisation per local label (%)", "", *_table(header, rows)]


def _parse_section(metrics: dict) -> list[str]:
    stats = metrics["parse"]
    rows = [[name, s["records"], s["complete"], _pct(s["rate"])] for name, s in stats.items()]
    lines = ["## Parse rate", "", *_table(["Records", "Outputs", "Parsed completely", "Rate (%)"], rows)]
    if stats["all"]["top_unparsed"]:
        lines += ["Most frequent fragments the grammar could not read:", ""]
        lines += _table(["Fragment", "Count"], [[f"`{t}`", n] for t, n in stats["all"]["top_unparsed"]])
    return lines


def overlay(image: Image.Image, record: Prediction, grammar: Grammar) -> Image.Image:
    """The image with ground-truth boxes in green and predicted boxes in red, each labelled (paper Figure 3)."""
    truth = [(f["label"], f["box"]) for f in record.gt_findings]
    predicted = [(label, [v / 100 for v in box]) for label, box in grammar.parse(record.output).findings]
    return draw_boxes(draw_boxes(image, truth, colour=TRUTH_COLOUR), predicted, colour=PREDICTED_COLOUR)


def write_overlays(
    predictions: Sequence[Prediction], grammar: Grammar, images: Callable[[str], Image.Image], out_dir: Path,
    count: int = OVERLAYS,
) -> list[Path]:
    """`out_dir/<image_id>.png` for the first `count` identify records with a predicted or true box (an id
    with folders, as a box CSV's relative paths give, keeps them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in predictions
              if p.task == "identify" and (p.gt_findings or grammar.parse(p.output).findings)][:count]
    paths = []
    for record in chosen:
        path = out_dir / f"{record.image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        overlay(images(record.image_id), record, grammar).save(path)
        paths.append(path)
    return paths


def write_report(
    metrics: dict,
    predictions: Sequence[Prediction],
    out_dir: Path,
    grammar: Grammar,
    images: Callable[[str], Image.Image] | None = None,
    overlays: int = OVERLAYS,
) -> ReportFiles:
    """`out_dir/report.md` with the paper's tables, and `out_dir/overlays/` when `images` is given; `grammar` is
    the one `metrics` were computed with (its labels head the tables, its parser reads the overlays' boxes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, vocabulary = metrics["counts"], grammar.vocabulary
    names = finding_names(vocabulary)
    lines = [
        "# Evaluation report",
        "",
        f"{counts['records']} records over {counts['images']} images: {counts['identify']} `identify`, "
        f"{counts['vqa']} `vqa`. {' / '.join(names)} from: "
        + ", ".join(f"{n} `{task}`" for task, n in counts["finding_from"].items()) + ". Labels: the vocabulary "
        f"{vocabulary.describe()}.",
        "",
        ("*reference*: the authors' evaluation (label = lower-cased name found as a substring, even inside a longer "
         "word; Accuracy@t counts a ground-truth box as found when any predicted box of its class has "
         "IoU > t, with no penalty for extra boxes). *strict*: whole-word labels from the grammar; boxes matched "
         "one to one (IoU >= t); mAP from COCOeval, beside the Kaggle VinBigData VOC AP. Text metrics (Tables 4-5) "
         "in two blocks: *reference*, the authors' definitions (stemmed ROUGE on nltk sentences with `<p>` tags kept, "
         "13a-token case-sensitive BLEU, nltk METEOR, CIDEr with the roles swapped as their code does), which is how "
         "the paper's Tables 4-5 were computed; *ours*, boxes and tags stripped, coco-caption BLEU/METEOR/CIDEr on "
         "lower-case words. Numbers in %, CIDEr excepted."),
        "",
        *_table1(metrics, names),
        *_table2(metrics, vocabulary),
        *_table3(metrics),
        *_text_table(metrics, "identify", 4, "localisation task (`identify`)"),
        *_text_table(metrics, "vqa", 5, "classification task (`vqa`)"),
        *_per_label_table(metrics, "local", vocabulary.local_labels, "Local labels (as Tables 8-10)"),
        *_per_label_table(metrics, "global", vocabulary.global_labels, "Global labels (as Tables 11-13)",
                          _no_diseases(vocabulary)),
        *_localisation_per_class(metrics, vocabulary.local_labels),
        *_parse_section(metrics),
    ]
    paths = write_overlays(predictions, grammar, images, out_dir / "overlays", overlays) if images is not None else []
    if paths:
        lines += ["## Overlays (red: predicted, green: ground truth)", ""]
        lines += [f"![{p.stem}](overlays/{p.relative_to(out_dir / 'overlays').as_posix()})" for p in paths] + [""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return ReportFiles(report, paths)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def scalars(metrics: dict) -> dict[str, float]:
    """The headline numbers as flat `family/what/metric` names (Tables 1-5 and the parse rate); text metrics as
    `text/<task>/<metric>` (ours) and `reference/text/<task>/<metric>` (the authors' definitions)."""
    out: dict[str, float | None] = {}
    for family in FAMILIES:
        finding = _report(metrics, family, "finding")
        if finding is not None:  # its first two rows: finding, and the vocabulary's no-finding label
            for slug, name in zip(FINDING_SLUGS, finding):
                for k in ("precision", "recall", "f1-score"):
                    out[f"{family}/{slug}/{k.replace('-score', '')}"] = finding[name][k]
        for scope in ("global", "local"):
            report = _report(metrics, family, scope)
            if report is not None:
                for a in AVERAGES:
                    out[f"{family}/{scope}/{_slug(a)}_f1"] = report[a]["f1-score"]
    ref, strict = metrics["reference"]["localisation"], metrics["strict"]["localisation"]
    if ref is not None:
        for t in metrics["thresholds"]:
            out[f"reference/accuracy@{t}"] = ref["accuracy"][t]
            for k in ("precision", "recall", "f1"):
                out[f"strict/box_{k}@{t}"] = strict["thresholds"][t][k]
        for key in ("map", "kaggle_map"):
            out[f"strict/{key}@{metrics['strict'][key]['iou']:g}"] = metrics["strict"][key]["map"]
    for prefix, block in (("text", metrics["text"]), ("reference/text", metrics["reference"]["text"])):
        for task, text in block.items():
            if text is not None:
                for k in (*TEXT_COLUMNS, "cider"):
                    out[f"{prefix}/{task}/{k}"] = text[k]
    for name, stats in metrics["parse"].items():
        out[f"parse/{name}_rate"] = stats["rate"]
    return {k: float(v) for k, v in out.items() if v is not None}


def log_tensorboard(writer: Any, metrics: dict, step: int = 0, overlays: Sequence[Path] = ()) -> None:
    """Write `scalars(metrics)` under `eval/` and the given overlay PNGs to a TensorBoard SummaryWriter."""
    for name, value in scalars(metrics).items():
        writer.add_scalar(f"eval/{name}", value, step)
    for path in overlays:
        picture = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image(f"eval/overlay/{path.stem}", picture, step, dataformats="HWC")
    writer.flush()
