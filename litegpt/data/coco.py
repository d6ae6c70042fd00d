"""COCO detection JSON (`litegpt prepare --format coco`).

`<root>/annotations/instances_train.json` and/or `instances_test.json` (with only the train file, the
`--holdout` hash hold-out makes the test split). `file_name` is relative to `<root>/images/`; `bbox` is
[x, y, width, height] in pixels. The categories are the local labels (without a label list: in category
id order, the vocabulary named after the root folder). COCO has no image-level labels, so the inferred
vocabulary has no global label but the no-finding one, which an image without annotations gets. The
annotations are taken as given (a consensus: no rater policy, boxes not merged). An annotation that exactly
repeats an earlier one (same image, category and box) is used once and reported.

What makes a file unusable (not JSON, a missing key, an annotation naming an image or category the file
does not have) stops the run before any work, naming the file and the entry; a box that is not a box
removes its image, naming the annotation and the value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from litegpt.data.sources import (
    CONSENSUS,
    Annotation,
    DatasetError,
    ImageEntry,
    ImageRecord,
    Problem,
    assemble,
    holdout_split,
    image_id_of,
    relative_image,
    valid_box,
)
from litegpt.labels import DEFAULT_NO_FINDING, UnknownLabel, Vocabulary, VocabularyError

SPLIT_FILES = {"train": "annotations/instances_train.json", "test": "annotations/instances_test.json"}
IMAGES = "images"


def _load(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO file is a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: {key!r} must be a list, got {type(data.get(key)).__name__}")
        for index, item in enumerate(data[key]):
            if not isinstance(item, dict):
                raise DatasetError(f"{path}: {key}[{index}] is not an object: {item!r}")
    return data


def _field(item: Mapping[str, Any], key: str, types: tuple[type, ...], where: str) -> Any:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, types):
        raise DatasetError(f"{where}: {key!r} is {value!r}; expected {' or '.join(t.__name__ for t in types)}")
    return value


def _categories(data: dict[str, dict], files: dict[str, Path]) -> dict[int, str]:
    """Category id -> name, the same in every file, in id order."""
    found: dict[str, dict] = {}
    for split, path in files.items():
        categories: dict[int, str] = {}
        for index, item in enumerate(data[split]["categories"]):
            where = f"{path} categories[{index}]"
            cid = _field(item, "id", (int,), where)
            if cid in categories:
                raise DatasetError(f"{where}: category id {cid!r} is given twice")
            categories[cid] = " ".join(_field(item, "name", (str,), where).split())
        found[split] = dict(sorted(categories.items()))
    (first, cats), *others = found.items()
    for split, other in others:
        if other != cats:
            raise DatasetError(f"{files[split]}: categories {other} differ from those of {files[first]} ({cats}); "
                               "every file must have the same categories")
    return cats


def _labels(categories: dict[int, str], vocabulary: Vocabulary, path: Path) -> dict[int, str]:
    """Category id -> the vocabulary's local label."""
    labels = {}
    for cid, name in categories.items():
        try:
            label = vocabulary.canonical(name)
        except UnknownLabel as exc:
            raise DatasetError(f"{path}: category id {cid!r}: {exc}") from None
        if label not in vocabulary.local_labels:
            raise DatasetError(f"{path}: category id {cid!r} {name!r} is not a local label of {vocabulary.describe()}; "
                               "COCO categories are boxed, so they must be local labels")
        labels[cid] = label
    return labels


def _bbox(value: Any) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"bbox {value!r} is not four numbers [x, y, width, height]")
    x, y, w, h = value
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {value!r} has a width or height <= 0")
    return valid_box([x, y, x + w, y + h])


def read_coco(root: Path, holdout: float, vocabulary: Vocabulary | None, no_finding: str | None
              ) -> tuple[list[ImageRecord], list[Problem], Vocabulary]:
    files = {split: root / name for split, name in SPLIT_FILES.items() if (root / name).is_file()}
    if not files:
        raise DatasetError(f"{root}: not a COCO root: expected {' and/or '.join(SPLIT_FILES.values())}")
    data = {split: _load(path) for split, path in files.items()}
    categories = _categories(data, files)
    if vocabulary is None:
        try:
            vocabulary = Vocabulary.build(root.resolve().name or "dataset", list(categories.values()), (),
                                          no_finding or DEFAULT_NO_FINDING)
        except VocabularyError as exc:
            raise DatasetError(f"{next(iter(files.values()))}: cannot infer the label vocabulary: {exc}") from None
    labels = _labels(categories, vocabulary, next(iter(files.values())))
    entries: dict[str, ImageEntry] = {}
    for split, path in files.items():
        by_coco_id: dict[int | str, ImageEntry] = {}
        for index, item in enumerate(data[split]["images"]):
            where = f"{path} images[{index}]"
            coco_id = _field(item, "id", (int, str), where)
            file_name = relative_image(_field(item, "file_name", (str,), where), where)
            image_id = image_id_of(file_name.as_posix())
            if coco_id in by_coco_id:
                raise DatasetError(f"{where}: image id {coco_id!r} is given twice")
            if image_id in entries:
                raise DatasetError(f"{where}: {file_name.as_posix()} is listed twice (as image id {image_id})")
            image_split = split if len(files) > 1 else holdout_split(image_id, holdout)
            entry = ImageEntry(image_id, image_split, root / IMAGES / file_name, path.name)
            entry.annotations.append(Annotation(CONSENSUS, vocabulary.no_finding, None, path.name, index))
            by_coco_id[coco_id] = entries[image_id] = entry
        first: dict[tuple, tuple[int, str]] = {}
        for index, item in enumerate(data[split]["annotations"]):
            name = f"annotation id {item['id']}" if "id" in item else f"annotations[{index}]"
            image_ref, category = item.get("image_id"), item.get("category_id")
            if image_ref not in by_coco_id:
                raise DatasetError(f"{path} {name}: image_id {image_ref!r} is not an image of this file")
            if category not in labels:
                raise DatasetError(f"{path} {name}: category_id {category!r} is not a category of this file")
            entry = by_coco_id[image_ref]
            if entry.bad is not None:
                continue
            try:
                box = _bbox(item.get("bbox"))
            except (ValueError, TypeError) as exc:
                entry.bad = f"{path.name} {name}: {exc}"
                continue
            earlier, earlier_name = first.setdefault((entry.image_id, labels[category], box), (index, name))
            if earlier != index:
                entry.repeats.append(f"{name} repeats {earlier_name}")
                continue
            if entry.annotations[0].box is None:  # the image has a finding: not the no-finding label
                entry.annotations.clear()
            row = item["id"] if isinstance(item.get("id"), int) else index
            entry.annotations.append(Annotation(CONSENSUS, labels[category], box, path.name, row))
    named_in = " or ".join(p.name for p in files.values())
    records, problems = assemble(list(entries.values()), root / IMAGES, named_in, holdout)
    return records, problems, vocabulary
