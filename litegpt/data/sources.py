"""Dataset readers: the record types every reader returns, what readers share, and the VinDr family's two
layouts: PhysioNet (DICOM + four CSVs) and Kaggle VinBigData (train.csv). The generic box CSV and COCO
readers live in `box_csv` and `coco`; `readers.read_dataset` picks one by format.

A reader turns a dataset root into `ImageRecord`s (one per image, every rater's annotations attached,
coordinates still in original pixels) and a list of `Problem`s for what it could not use. It validates
the CSVs' columns before anything else, so a wrong file stops the run at once with the column named.
A value it cannot read (a label flag that is not 0/1, a box that is not a box) removes that image with
file, row and value named; it never becomes a default. A row that exactly repeats an earlier one is used
once and reported: consensus rows (PhysioNet test) are taken as given, so a repeat would double a box.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from litegpt.labels import KAGGLE_CLASSES, VINDR_CXR, UnknownLabel, Vocabulary

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")  # what prepare converts (DICOM or Pillow)
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
CONSENSUS = "consensus"  # rater name used where a CSV gives consensus labels with no rater column
# Label flags: VinDr writes 0/1 (0.0/1.0 after a spreadsheet round trip); these words (any case) are read
# too because their meaning is unambiguous (pandas writes booleans as True/False). Anything else is refused.
FLAG_WORDS = {"true": True, "false": False, "yes": True, "no": False}


class DatasetError(ValueError):
    """The dataset root or one of its annotation files cannot be used at all (missing file, missing column)."""


@dataclass(frozen=True)
class Annotation:
    """One annotation: a box of a local label by one rater, or a rater's no-finding label (box None)."""

    rater: str
    label: str
    box: tuple[float, float, float, float] | None
    file: str
    row: int  # CSV: 1-based line number (header is line 1); COCO: the annotation's id


@dataclass
class ImageRecord:
    image_id: str
    split: str
    path: Path
    annotations: list[Annotation] = field(default_factory=list)
    # rater -> global labels set to 1 in image_labels_*.csv (None when the release has no global labels)
    global_labels: dict[str, set[str]] | None = None
    consensus: bool = False  # labels are a consensus as given (PhysioNet test): no rater policy applies


@dataclass(frozen=True)
class Problem:
    """Something in the input that could not be used; it becomes a `dropped` entry of the manifest.

    For `duplicate_row` what is dropped is a CSV row that repeats an earlier one; the image is kept.
    """

    image_id: str
    split: str
    kind: str  # missing_file | bad_annotation | bad_dicom | bad_image | label_policy | duplicate_row
    reason: str

    def as_dict(self) -> dict:
        return {"image_id": self.image_id, "split": self.split, "kind": self.kind, "reason": self.reason}


def detect_layout(root: Path) -> str:
    if (root / "annotations" / "annotations_train.csv").is_file():
        return "physionet"
    if (root / "train.csv").is_file():
        return "kaggle"
    raise DatasetError(
        f"{root}: not a VinDr-CXR root: expected annotations/annotations_train.csv (PhysioNet layout) "
        "or train.csv (Kaggle VinBigData layout)"
    )


@dataclass
class ImageEntry:
    """An image as a csv/coco annotation file describes it, before its file is looked for."""

    image_id: str
    split: str
    path: Path
    file: str  # the annotation file that names it
    annotations: list[Annotation] = field(default_factory=list)
    global_labels: dict[str, set[str]] = field(default_factory=dict)
    consensus: bool = True
    bad: str | None = None  # the first reason it cannot be used
    repeats: list[str] = field(default_factory=list)


def image_id_of(relative: str) -> str:
    """The id of an image file given relative to its folder: the path without suffix, "/" kept."""
    return Path(relative).with_suffix("").as_posix()


def relative_image(value: str, where: str) -> Path:
    """An image path cell (relative, one of IMAGE_SUFFIXES); DatasetError naming `where` otherwise."""
    path = Path(value)
    if not value or path.is_absolute() or ".." in path.parts or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DatasetError(f"{where}: image {value!r} is not a relative path to a {'/'.join(IMAGE_SUFFIXES)} file")
    return path


def assemble(entries: list[ImageEntry], base: Path, named_in: str, holdout: float
             ) -> tuple[list[ImageRecord], list[Problem]]:
    """Records of the entries whose file exists and whose annotations are usable; problems for the rest,
    for repeated rows, and for image files (ids relative to `base`) in the entries' folders that no
    annotation file (`named_in`) names."""
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    for e in entries:
        if not e.path.is_file():
            problems.append(Problem(e.image_id, e.split, "missing_file",
                                    f"{e.file} names image {e.image_id} but {e.path} does not exist"))
        elif e.bad is not None:
            problems.append(Problem(e.image_id, e.split, "bad_annotation", e.bad))
        else:
            records.append(ImageRecord(e.image_id, e.split, e.path, e.annotations, e.global_labels, e.consensus))
            problems += repeat_problem(e.image_id, e.split, e.file, {e.image_id: e.repeats} if e.repeats else {})
    named = {e.path for e in entries}
    for folder in sorted({e.path.parent for e in entries if e.path.parent.is_dir()}):
        for orphan in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p not in named):
            image_id = image_id_of(orphan.relative_to(base).as_posix())
            problems.append(Problem(image_id, holdout_split(image_id, holdout), "bad_annotation",
                                    f"{orphan} has no annotation in {named_in}"))
    return records, problems


def check_holdout(holdout: float) -> float:
    if not 0.0 < holdout < 1.0:
        raise DatasetError(f"--holdout must be a fraction between 0 and 1, got {holdout}")
    return holdout


def holdout_split(image_id: str, fraction: float) -> str:
    """Deterministic train/test assignment from the id alone, so it never changes between runs or machines."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return "test" if digest / 2**64 < fraction else "train"


def read_csv(path: Path, required: tuple[str, ...], as_text: bool = False) -> pd.DataFrame:
    """The CSV with its columns checked; `as_text` keeps every cell as written (empty cells are NaN)."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        dtype = str if as_text else {"image_id": str, "rad_id": str, "rad_ID": str, "class_name": str}
        frame = pd.read_csv(path, dtype=dtype, encoding="utf-8-sig")  # a spreadsheet's byte order mark is no column
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if "rad_ID" in frame.columns and "rad_id" not in frame.columns:
        frame = frame.rename(columns={"rad_ID": "rad_id"})
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(frame.columns)}")
    return frame


def _parse_box_rows(
    frame: pd.DataFrame, path: Path, default_rater: str | None, vocabulary: Vocabulary,
    class_names: dict[int, str] | None = None,
) -> tuple[dict[str, list[Annotation]], dict[str, str], dict[str, list[str]]]:
    """Annotations per image id; per image id the first reason it cannot be used (bad rows); per image id
    the rows that repeat an earlier row's rater, label and box (left out)."""
    by_image: dict[str, list[Annotation]] = {}
    bad: dict[str, str] = {}
    first: dict[tuple, int] = {}
    repeats: dict[str, list[str]] = {}
    has_rater = "rad_id" in frame.columns
    for line, row in zip(range(2, len(frame) + 2), frame.itertuples(index=False)):
        image_id = str(row.image_id).strip()
        where = f"{path.name} row {line}"
        rater = str(row.rad_id).strip() if has_rater and not _isnan(row.rad_id) else (default_rater or CONSENSUS)
        try:
            label = vocabulary.canonical(row.class_name)
            if class_names is not None and int(row.class_id) in class_names and class_names[int(row.class_id)] != label:
                raise ValueError(f"class_id {row.class_id} is {class_names[int(row.class_id)]!r}, not {label!r}")
            coords = [getattr(row, c) for c in BOX_COLUMNS]
            if label == vocabulary.no_finding:
                box = None
            elif label not in vocabulary.local_labels:
                raise ValueError(f"{label!r} is a global label, it cannot have a box")
            else:
                box = valid_box(coords)
        except (UnknownLabel, ValueError, TypeError) as exc:
            bad.setdefault(image_id, f"{where}: {exc}")
            continue
        earlier = first.setdefault((image_id, rater, label, box), line)
        if earlier != line:
            repeats.setdefault(image_id, []).append(f"row {line} repeats row {earlier}")
            continue
        by_image.setdefault(image_id, []).append(Annotation(rater, label, box, path.name, line))
    return by_image, bad, repeats


def _parse_label_rows(
    frame: pd.DataFrame, path: Path, consensus: bool, vocabulary: Vocabulary
) -> tuple[dict[str, dict[str, set[str]]], dict[str, str], dict[str, list[str]]]:
    """Per image id and rater the global labels flagged 1; per image id the first bad row; per image id the
    rows that exactly repeat an earlier row of the same rater. Two different rows of one rater are bad."""
    by_image: dict[str, dict[str, set[str]]] = {}
    bad: dict[str, str] = {}
    first: dict[tuple[str, str], tuple[int, tuple]] = {}
    repeats: dict[str, list[str]] = {}
    has_rater = "rad_id" in frame.columns and not consensus
    for line, row in zip(range(2, len(frame) + 2), frame.itertuples(index=False)):
        values = dict(zip(frame.columns, row))
        image_id = str(values["image_id"]).strip()
        rater = str(values["rad_id"]).strip() if has_rater else CONSENSUS
        where = f"{path.name} row {line}"
        try:
            chosen = {g for g in vocabulary.global_labels if _flag(values[g], g)}
        except ValueError as exc:
            bad.setdefault(image_id, f"{where}: {exc}")
            continue
        earlier, cells = first.setdefault((image_id, rater), (line, row))
        if earlier == line:
            by_image.setdefault(image_id, {})[rater] = chosen
        elif all(a == b or (_isnan(a) and _isnan(b)) for a, b in zip(cells, row)):  # empty cells are NaN
            repeats.setdefault(image_id, []).append(f"row {line} repeats row {earlier}")
        else:
            who = "the consensus" if rater == CONSENSUS else f"rater {rater}"
            bad.setdefault(image_id, f"{where}: gives {who}'s labels for image {image_id} again, "
                                     f"differently from row {earlier}")
    return by_image, bad, repeats


def repeat_problem(image_id: str, split: str, file: str, repeats: dict[str, list[str]]) -> list[Problem]:
    """The `duplicate_row` problem of one image in one CSV, if it has repeated rows."""
    if image_id not in repeats:
        return []
    return [Problem(image_id, split, "duplicate_row", f"{file}: {', '.join(repeats[image_id])}; "
                                                      "each repeated row is used once")]


def valid_box(coords: list) -> tuple[float, float, float, float]:
    values = [float(v) for v in coords]
    if any(math.isnan(v) or math.isinf(v) for v in values):
        raise ValueError(f"box {coords} has missing coordinates")
    x0, y0, x1, y1 = values
    if min(values) < 0:
        raise ValueError(f"box {coords} has negative coordinates")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {coords} has x_max <= x_min or y_max <= y_min")
    return (x0, y0, x1, y1)


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def read_physionet(root: Path, vocabulary: Vocabulary) -> tuple[list[ImageRecord], list[Problem]]:
    """PhysioNet layout: one image_labels column per label of `vocabulary` (any spelling it accepts)."""
    ann_dir = root / "annotations"
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    label_columns = vocabulary.all_labels
    frames = {}
    # Validate all four CSVs before any work, so a wrong file stops the run with the column named.
    for split in ("train", "test"):
        boxes = read_csv(ann_dir / f"annotations_{split}.csv", ("image_id", "class_name") + BOX_COLUMNS)
        labels = read_csv(ann_dir / f"image_labels_{split}.csv", ("image_id",), as_text=True)
        labels = labels.rename(columns={c: vocabulary.canonical(c) for c in labels.columns if _is_label(c, vocabulary)})
        missing = [c for c in label_columns if c not in labels.columns]
        if missing:
            raise DatasetError(f"{ann_dir / f'image_labels_{split}.csv'}: missing required column(s) {', '.join(missing)}")
        frames[split] = (boxes, labels)
    for split, (boxes, labels) in frames.items():
        box_path, label_path = ann_dir / f"annotations_{split}.csv", ann_dir / f"image_labels_{split}.csv"
        consensus = split == "test"
        by_image, bad, box_repeats = _parse_box_rows(boxes, box_path, CONSENSUS if consensus else None, vocabulary)
        global_by_image, bad_labels, label_repeats = _parse_label_rows(labels, label_path, consensus, vocabulary)
        for image_id, reason in bad_labels.items():
            bad.setdefault(image_id, reason)
        ids = sorted(set(by_image) | set(bad) | set(global_by_image))
        files = {p.stem: p for p in (root / split).glob("*.dicom")} if (root / split).is_dir() else {}
        for image_id in ids:
            path = files.get(image_id)
            if path is None:
                problems.append(Problem(image_id, split, "missing_file",
                                        f"{box_path.name} names image {image_id} but {split}/{image_id}.dicom does not exist"))
            elif image_id in bad:
                problems.append(Problem(image_id, split, "bad_annotation", bad[image_id]))
            elif image_id not in by_image:
                problems.append(Problem(image_id, split, "bad_annotation",
                                        f"{box_path.name} has no row for image {image_id}"))
            else:
                records.append(ImageRecord(image_id, split, path, by_image[image_id],
                                           global_by_image.get(image_id, {}), consensus))
                problems += repeat_problem(image_id, split, box_path.name, box_repeats)
                problems += repeat_problem(image_id, split, label_path.name, label_repeats)
        for orphan in sorted(set(files) - set(ids)):
            problems.append(Problem(orphan, split, "bad_annotation",
                                    f"{split}/{orphan}.dicom has no row in {box_path.name}"))
    return records, problems


def _is_label(column: str, vocabulary: Vocabulary) -> bool:
    try:
        vocabulary.canonical(column)
        return True
    except UnknownLabel:
        return False


def _flag(value: object, column: str) -> bool:
    """One label cell, read as text: 0 or 1 as a number (0, 1, 0.0, 1.0) or a FLAG_WORDS word; else ValueError."""
    text = value.strip() if isinstance(value, str) else ""
    if text.lower() in FLAG_WORDS:
        return FLAG_WORDS[text.lower()]
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number in (0.0, 1.0):
        return number == 1.0
    shown = repr(value) if isinstance(value, str) else "empty"
    raise ValueError(f"column {column!r}: value {shown} is not a label flag "
                     f"(expected 0 or 1, 0.0 or 1.0, true/false or yes/no)")


def read_kaggle(root: Path, holdout: float, vocabulary: Vocabulary) -> tuple[list[ImageRecord], list[Problem]]:
    """Kaggle layout. Each row's class_id must agree with its class_name only for VinDr-CXR's own vocabulary
    (Kaggle's ids, `KAGGLE_CLASSES`); with another vocabulary class_id is required but not checked."""
    path = root / "train.csv"
    frame = read_csv(path, ("image_id", "class_name", "class_id", "rad_id") + BOX_COLUMNS)
    class_names = dict(enumerate(KAGGLE_CLASSES)) if vocabulary == VINDR_CXR else None
    by_image, bad, repeats = _parse_box_rows(frame, path, None, vocabulary, class_names)
    files = {p.stem: p for p in (root / "train").glob("*.dicom")} if (root / "train").is_dir() else {}
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    for image_id in sorted(set(by_image) | set(bad)):
        split = holdout_split(image_id, holdout)
        if image_id not in files:
            problems.append(Problem(image_id, split, "missing_file",
                                    f"{path.name} names image {image_id} but train/{image_id}.dicom does not exist"))
        elif image_id in bad:
            problems.append(Problem(image_id, split, "bad_annotation", bad[image_id]))
        else:
            records.append(ImageRecord(image_id, split, files[image_id], by_image[image_id], None, False))
            problems += repeat_problem(image_id, split, path.name, repeats)
    for orphan in sorted(set(files) - set(by_image) - set(bad)):
        problems.append(Problem(orphan, holdout_split(orphan, holdout), "bad_annotation",
                                f"train/{orphan}.dicom has no row in {path.name}"))
    return records, problems
