"""Which reader reads a dataset root: `read_dataset` by format (vindr, csv, coco)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from litegpt.data import box_csv, coco, sources
from litegpt.labels import VINDR_CXR, Vocabulary

FORMATS = ("vindr", "csv", "coco")


class Dataset(NamedTuple):
    """What a reader found: the usable images sorted by (split, image_id), the problems, and the vocabulary
    (the one given, or for csv/coco without one, the one inferred from the annotations)."""

    records: list[sources.ImageRecord]
    problems: list[sources.Problem]
    vocabulary: Vocabulary


def read_dataset(root: Path, fmt: str = "vindr", *, layout: str = "auto", holdout: float = 0.1,
                 vocabulary: Vocabulary | None = None, no_finding: str | None = None) -> Dataset:
    """All images of a dataset root in format `fmt` (vindr: `layout` auto, physionet or kaggle).

    `vocabulary` None means VinDr-CXR's for vindr and the one inferred from the annotations for csv/coco
    (its no-finding label `no_finding`, default `DEFAULT_NO_FINDING`); with a vocabulary, `no_finding` is unused.
    """
    root = Path(root)
    if not root.is_dir():
        raise sources.DatasetError(f"{root}: dataset root does not exist")
    if fmt == "vindr":
        layout = sources.detect_layout(root) if layout == "auto" else layout
        vocabulary = vocabulary or VINDR_CXR
        if layout == "physionet":
            records, problems = sources.read_physionet(root, vocabulary)
        elif layout == "kaggle":
            records, problems = sources.read_kaggle(root, sources.check_holdout(holdout), vocabulary)
        else:
            raise sources.DatasetError(f"unknown layout {layout!r}; expected auto, physionet or kaggle")
    elif fmt in ("csv", "coco"):
        if layout not in ("auto", fmt):
            raise sources.DatasetError(f"--layout {layout} is a layout of the vindr format, not of {fmt}")
        reader = box_csv.read_box_csv if fmt == "csv" else coco.read_coco
        records, problems, vocabulary = reader(root, sources.check_holdout(holdout), vocabulary, no_finding)
    else:
        raise sources.DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    records.sort(key=lambda r: (r.split, r.image_id))
    return Dataset(records, problems, vocabulary)
