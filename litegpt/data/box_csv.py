"""The generic box CSV (`litegpt prepare --format csv`): `<root>/annotations.csv`, one row per label.

Columns: `image` (path relative to the root: .dcm/.dicom, .png, .jpg/.jpeg), `label`, `x_min`, `y_min`,
`x_max`, `y_max` (pixels of the original image; all four empty for an image-level label and for the
no-finding label), optional `rater`, optional `split` (train or test; without the column the `--holdout`
hash hold-out decides). A row without a rater (or a file without the column) is a consensus label, taken
as given; one image's rows all have a rater or none has.

Without a label list the vocabulary is inferred: a label boxed in any row is local, one never boxed is
global, each sorted by name, named after the root folder. What makes the whole file unusable (a missing
column, a bad split, a label both boxed and unboxed) stops the run before any work, naming the line and
the value; a bad value in a row (an unknown label, a box that is not a box) removes that image with the
line and value named, as the VinDr readers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from litegpt.data.sources import (
    BOX_COLUMNS,
    CONSENSUS,
    Annotation,
    DatasetError,
    ImageEntry,
    ImageRecord,
    Problem,
    assemble,
    holdout_split,
    image_id_of,
    read_csv,
    relative_image,
    valid_box,
)
from litegpt.labels import DEFAULT_NO_FINDING, UnknownLabel, Vocabulary, VocabularyError

ANNOTATIONS = "annotations.csv"
SPLIT_VALUES = ("train", "test")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number (header is line 1)
    image: Path
    label: str  # as written, whitespace runs collapsed
    coords: tuple[str, str, str, str]  # as written; "" for an empty cell
    rater: str  # "" when none is given
    split: str  # "" when the file has no split column


def _cell(value: object) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def read_rows(path: Path) -> list[Row]:
    """The CSV's rows with the columns and every image path and split value checked (DatasetError)."""
    frame = read_csv(path, ("image", "label") + BOX_COLUMNS, as_text=True)
    has_split = "split" in frame.columns
    rows = []
    for line, values in zip(range(2, len(frame) + 2), frame.to_dict("records")):
        where = f"{path} line {line}"
        split = _cell(values.get("split")).lower()
        if has_split and split not in SPLIT_VALUES:
            raise DatasetError(f"{where}: split {values.get('split')!r} is not one of {', '.join(SPLIT_VALUES)}")
        rows.append(Row(line, relative_image(_cell(values["image"]), where), _cell(values["label"]),
                        tuple(_cell(values[c]) for c in BOX_COLUMNS), _cell(values.get("rater")), split))
    return rows


def infer_vocabulary(rows: list[Row], path: Path, name: str, no_finding: str) -> Vocabulary:
    """Local labels: those with a box in some row; global: those never boxed (each sorted by name)."""
    boxed: dict[str, Row] = {}
    unboxed: dict[str, Row] = {}
    spelling: dict[str, str] = {}  # first spelling of each label, matched as Vocabulary.canonical does
    for row in rows:
        key = row.label.lower()
        if not row.label or key == no_finding.lower():
            continue
        spelling.setdefault(key, row.label)
        (boxed if any(row.coords) else unboxed).setdefault(key, row)
        if key in boxed and key in unboxed:
            with_box, without = boxed[key], unboxed[key]
            raise DatasetError(f"{path}: label {row.label!r} has a box on line {with_box.line} and none on line "
                               f"{without.line}; a label is either local (always boxed) or global (never boxed). "
                               "Fix the rows, or give the label list with --labels")
    try:
        return Vocabulary.build(name, sorted(spelling[k] for k in boxed), sorted(spelling[k] for k in unboxed),
                                no_finding)
    except VocabularyError as exc:
        raise DatasetError(f"{path}: cannot infer the label vocabulary: {exc}") from None


def read_box_csv(root: Path, holdout: float, vocabulary: Vocabulary | None, no_finding: str | None
                 ) -> tuple[list[ImageRecord], list[Problem], Vocabulary]:
    path = root / ANNOTATIONS
    rows = read_rows(path)
    if vocabulary is None:
        name = root.resolve().name or "dataset"
        vocabulary = infer_vocabulary(rows, path, name, no_finding or DEFAULT_NO_FINDING)
    entries: dict[str, ImageEntry] = {}
    first_line: dict[str, int] = {}
    first: dict[tuple, int] = {}
    rater_line: dict[str, tuple[bool, int]] = {}
    for row in rows:
        image_id = image_id_of(row.image.as_posix())
        split = row.split or holdout_split(image_id, holdout)
        entry = entries.get(image_id)
        if entry is None:
            entry = entries[image_id] = ImageEntry(image_id, split, root / row.image, path.name)
            first_line[image_id] = row.line
        elif entry.path != root / row.image:
            raise DatasetError(f"{path} line {row.line}: image {row.image.as_posix()} has the id {image_id} of "
                               f"{entry.path.relative_to(root).as_posix()} (line {first_line[image_id]}); "
                               "an image's id is its path without the suffix, so two images must differ in more than that")
        elif entry.split != split:
            raise DatasetError(f"{path} line {row.line}: image {image_id} is in split {split!r} here but "
                               f"{entry.split!r} on line {first_line[image_id]}")
        if entry.bad is not None:
            continue
        has_rater, earlier = rater_line.setdefault(image_id, (bool(row.rater), row.line))
        try:
            if has_rater != bool(row.rater):
                raise ValueError(f"image {image_id} has rows with a rater and rows without (line {earlier}); "
                                 "its labels are either per rater or a consensus")
            _add(entry, row, vocabulary, first)
        except (UnknownLabel, ValueError, TypeError) as exc:
            entry.bad = f"{path.name} line {row.line}: {exc}"
    records, problems = assemble(list(entries.values()), root, path.name, holdout)
    return records, problems, vocabulary


def _add(entry: ImageEntry, row: Row, vocabulary: Vocabulary, first: dict[tuple, int]) -> None:
    """One row's label into `entry` (ValueError for a value it cannot use); a repeat is noted, not added."""
    if not row.label:
        raise ValueError("the label is empty")
    label = vocabulary.canonical(row.label)
    has_box = any(row.coords)
    if label in vocabulary.local_labels:
        if not has_box:
            raise ValueError(f"{label!r} is a local label and needs a box, but x_min..y_max are empty")
        box = valid_box([c or "nan" for c in row.coords])
    elif has_box:
        kind = "the no-finding label" if label == vocabulary.no_finding else "a global label"
        raise ValueError(f"{label!r} is {kind}, it cannot have a box (got {list(row.coords)})")
    else:
        box = None
    rater = row.rater or CONSENSUS
    entry.consensus = not row.rater
    earlier = first.setdefault((entry.image_id, rater, label, box), row.line)
    if earlier != row.line:
        entry.repeats.append(f"line {row.line} repeats line {earlier}")
    elif label in vocabulary.local_labels or label == vocabulary.no_finding:
        entry.annotations.append(Annotation(rater, label, box, entry.file, row.line))
    else:
        entry.global_labels.setdefault(rater, set()).add(label)

