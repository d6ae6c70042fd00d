"""Write a synthetic dataset shaped exactly like VinDr-CXR, or in the generic box CSV or COCO format, so
every later stage runs with no downloads.

`--format vindr` (the default) copies what makes the real release hard to read: the PhysioNet (or Kaggle)
file layout and CSV spellings, three disagreeing radiologists per training image, and DICOMs that vary the
way real exports do (MONOCHROME1/2, 12-16 stored bits, window tags present, multi-valued or missing,
rescale, a VOI LUT sequence, RLE and JPEG 2000 compression).

`--format csv` and `--format coco` use vocabularies of other sizes and names (labels.SYNTH_CSV, an
NIH ChestX-ray14-like one with global labels; labels.SYNTH_COCO, detection only), so a test proves that
nothing downstream assumes VinDr's labels. Their label priors come from each label's index, not from a
table. Both write `labels.yaml`: the vocabulary `litegpt prepare` infers from the files (sorted names,
named after the root folder), so `--labels R/labels.yaml` and inference agree.

- csv: `annotations.csv` with columns image, label, x_min, y_min, x_max, y_max, rater, split. A training
  image has the rows of three disagreeing raters (a rater with nothing gives one `No finding` row); a test
  image has the consensus rows with the rater cell left empty, as VinDr's PhysioNet test CSV does. Global
  labels and `No finding` have empty box cells. Images under `images/` cycle through 8-bit PNG, 16-bit PNG,
  JPEG, DICOM (`.dcm`, the VinDr storage profiles) and RGB PNG.
- coco: `annotations/instances_{train,test}.json` (bbox [x, y, w, h] in pixels, category ids 1.. in name
  order, no annotation = no finding), the consensus boxes, 8-bit PNGs under `images/`.

Each local label is drawn inside its box as its own texture, so a model can learn label and place.
Everything follows from the seed: a re-run gives byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import yaml
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from tqdm import tqdm

from litegpt.labels import (
    KAGGLE_CLASSES,
    SYNTH_COCO,
    SYNTH_CSV,
    VINDR_CXR,
    VINDR_CXR_DARK,
    VINDR_CXR_IMPLIES,
    VINDR_CXR_SYNTH_PRIORS,
    SynthPrior,
    Vocabulary,
)

FORMATS = ("vindr", "csv", "coco")
LAYOUTS = ("physionet", "kaggle")
# Every patient-identifying header value contains this marker, so a test can prove none reaches the shards.
PHI_MARKER = "SYNTHPHI"
# Written into every synthetic root; its presence is what allows a re-run to replace the files there.
SENTINEL = "SYNTHETIC_VINDR.txt"
# Everything a run of any format may have written (besides the sentinel), and the folders it made.
_OUTPUTS = ("train/*.dicom", "test/*.dicom", "annotations/*.csv", "annotations/instances_*.json", "train.csv",
            "annotations.csv", "images/*", "labels.yaml")
_FOLDERS = ("annotations", "images", "train", "test")
RATER_POOL = tuple(f"R{i}" for i in range(1, 18))
RATERS_PER_IMAGE = 3
# The PhysioNet train CSV spells one column by its alias (VINDR_CXR.aliases), the test CSV by its name.
TRAIN_SPELLING = {label: alias for alias, label in VINDR_CXR.aliases.items()}
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
CSV_COLUMNS = ("image", "label", *BOX_COLUMNS, "rater", "split")
# How each format stores its images: the plans cycle through these (image index modulo their number).
ENCODINGS: dict[str, tuple[str, ...]] = {
    "vindr": ("dicom",), "csv": ("png8", "png16", "jpeg", "dicom", "png_rgb"), "coco": ("png8",)}
_SUFFIX = {"dicom": ".dcm", "png8": ".png", "png16": ".png", "png_rgb": ".png", "jpeg": ".jpg"}
JPEG_QUALITY = 95
# Places where a vocabulary without a prior table puts its labels, taken in turn by label index: a lung
# field, the heart, a costophrenic angle, an apex, a small lung lesion, the mediastinum.
_AREAS = (
    SynthPrior((0.24, 0.36), (0.30, 0.70), (0.10, 0.20), (0.10, 0.20), True, 1.0),
    SynthPrior((0.50, 0.56), (0.60, 0.70), (0.32, 0.46), (0.14, 0.22), False, 1.0),
    SynthPrior((0.17, 0.23), (0.74, 0.80), (0.12, 0.20), (0.08, 0.16), True, 1.0),
    SynthPrior((0.20, 0.26), (0.22, 0.42), (0.10, 0.18), (0.15, 0.28), True, 1.0),
    SynthPrior((0.20, 0.38), (0.25, 0.70), (0.03, 0.09), (0.03, 0.09), True, 1.0),
    SynthPrior((0.48, 0.52), (0.35, 0.50), (0.12, 0.20), (0.30, 0.45), False, 1.0),
)


@dataclass(frozen=True)
class Priors:
    """What synth draws for a vocabulary: where and how often each local label occurs (`regions`), the
    diagnosis a finding suggests (`implies`), and which findings are darker than their surroundings."""

    vocabulary: Vocabulary
    regions: Mapping[str, SynthPrior]
    implies: Mapping[str, str]
    dark: frozenset[str]

    @classmethod
    def derived(cls, vocabulary: Vocabulary) -> Priors:
        """Priors from label indices alone: label i takes area i (cycling), frequency 1/(1 + i % 3), every
        fourth label is dark, and with diagnoses label i suggests diagnosis i modulo their number."""
        local, diseases = vocabulary.local_labels, vocabulary.diseases
        regions = {lab: dataclasses.replace(_AREAS[i % len(_AREAS)], weight=1.0 / (1 + i % 3))
                   for i, lab in enumerate(local)}
        implies = {lab: diseases[i % len(diseases)] for i, lab in enumerate(local)} if diseases else {}
        return cls(vocabulary, regions, implies, frozenset(local[3::4]))

    @property
    def unprompted(self) -> tuple[str, ...]:
        """Diagnoses no finding suggests (VinDr's unspecific one): some abnormal readings add them at random."""
        return tuple(g for g in self.vocabulary.diseases if g not in self.implies.values())


PRIORS: dict[str, Priors] = {
    "vindr": Priors(VINDR_CXR, VINDR_CXR_SYNTH_PRIORS, VINDR_CXR_IMPLIES, VINDR_CXR_DARK),
    "csv": Priors.derived(SYNTH_CSV),
    "coco": Priors.derived(SYNTH_COCO),
}
assert all(set(p.regions) == set(p.vocabulary.local_labels) for p in PRIORS.values()), \
    "every local label needs a region"


class Profile(NamedTuple):
    """One way a real CXR export stores its pixels; images cycle through these so every set has each."""

    photometric: str
    bits_stored: int
    signed: bool
    window: str  # "single" | "multi" | "none" | "voi_lut"
    rescale: tuple[float, float] | None  # (slope, intercept)
    syntax: UID
    modality: str


PROFILES: tuple[Profile, ...] = (
    Profile("MONOCHROME2", 12, False, "single", None, ExplicitVRLittleEndian, "DX"),
    Profile("MONOCHROME1", 16, False, "multi", (1.0, -1024.0), RLELossless, "CR"),
    Profile("MONOCHROME2", 14, False, "none", None, JPEG2000Lossless, "DX"),
    Profile("MONOCHROME1", 12, False, "voi_lut", None, ExplicitVRLittleEndian, "DX"),
    Profile("MONOCHROME2", 15, False, "single", (0.5, 100.0), ImplicitVRLittleEndian, "CR"),
    Profile("MONOCHROME1", 15, False, "single", None, JPEG2000Lossless, "DX"),
    Profile("MONOCHROME2", 16, False, "multi", None, RLELossless, "DX"),
    Profile("MONOCHROME1", 13, False, "none", (2.0, -4096.0), ExplicitVRLittleEndian, "CR"),
    Profile("MONOCHROME2", 12, True, "single", None, ExplicitVRLittleEndian, "DX"),
)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Finding:
    label: str
    box: Box  # x_min, y_min, x_max, y_max in original pixels


@dataclass(frozen=True)
class Reading:
    """What one radiologist reported for one image: no findings means `No finding`."""

    rad_id: str
    findings: tuple[Finding, ...]
    diagnoses: tuple[str, ...]


@dataclass(frozen=True)
class ImagePlan:
    """Everything about one image except its pixels; cheap to make and to send to a worker."""

    seed: int
    split: str
    index: int
    image_id: str
    rows: int
    cols: int
    profile: Profile
    truth: tuple[Finding, ...]  # what is drawn; also the test split's consensus boxes
    diagnoses: tuple[str, ...]  # consensus global labels (test split)
    readings: tuple[Reading, ...]  # per rater (train split)
    encoding: str  # dicom | png8 | png16 | png_rgb | jpeg
    file: str  # path relative to the root
    priors: Priors


# ---------------------------------------------------------------------------------------------- planning


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """An independent generator per image and purpose, so workers and optional parts never shift others."""
    return np.random.default_rng([seed, ("train", "test").index(split), index, stream])


def _image_id(seed: int, split: str, index: int) -> str:
    return hashlib.md5(f"litegpt-synth:{seed}:{split}:{index}".encode()).hexdigest()


def _box_iou(a: Box, b: Box) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _clip_box(x0: float, y0: float, x1: float, y1: float, cols: int, rows: int) -> Box:
    return (round(max(0.0, float(x0)), 2), round(max(0.0, float(y0)), 2),
            round(min(cols - 1.0, float(x1)), 2), round(min(rows - 1.0, float(y1)), 2))


def _sample_box(r: SynthPrior, rows: int, cols: int, rng: np.random.Generator) -> Box:
    u, v = rng.uniform(*r.u), rng.uniform(*r.v)
    if r.mirror and rng.random() < 0.5:
        u = 1.0 - u
    w, h = rng.uniform(*r.w) * cols, rng.uniform(*r.h) * rows
    return _clip_box(u * cols - w / 2, v * rows - h / 2, u * cols + w / 2, v * rows + h / 2, cols, rows)


def _jitter(box: Box, rows: int, cols: int, rng: np.random.Generator) -> Box:
    """Another rater's box for the same finding: each edge moves by up to 6% of the box (IoU stays > 0.6)."""
    w, h = box[2] - box[0], box[3] - box[1]
    d = rng.uniform(-0.06, 0.06, 4) * np.array([w, h, w, h])
    return _clip_box(*(np.array(box) + d), cols, rows)


def _chain(box: Box, rows: int, cols: int) -> list[Box]:
    """Three boxes shifted by a quarter width: neighbours overlap at IoU 0.6, the outer two only at 0.33."""
    d = 0.25 * (box[2] - box[0])
    return [_clip_box(box[0] + s, box[1], box[2] + s, box[3], cols, rows) for s in (-d, 0.0, d)]


def _is_finding_image(index: int, no_finding_frac: float) -> tuple[bool, int]:
    """Spread finding images evenly (not at random) so tiny sets still get both kinds; returns (is, rank)."""
    p = 1.0 - no_finding_frac
    rank = int(np.floor(index * p))
    return int(np.floor((index + 1) * p)) > rank, rank


def _truth(priors: Priors, pool: tuple[str, ...], rank: int, rows: int, cols: int,
           rng: np.random.Generator) -> list[Finding]:
    """The first label cycles through the pool so every label appears; extra ones follow the priors' weights."""
    weights = np.array([priors.regions[lab].weight for lab in pool])
    labels = [pool[rank % len(pool)]]
    labels += list(rng.choice(pool, size=rng.choice(4, p=[0.35, 0.35, 0.2, 0.1]), p=weights / weights.sum()))
    found: list[Finding] = []
    for label in labels:
        for _ in range(5):  # a second box of one label must be a separate finding, not a duplicate
            box = _sample_box(priors.regions[label], rows, cols, rng)
            if all(f.label != label or _box_iou(f.box, box) < 0.1 for f in found):
                found.append(Finding(str(label), box))
                break
    return found


def _diagnoses(priors: Priors, labels: set[str], rng: np.random.Generator, keep: float) -> tuple[str, ...]:
    found = {priors.implies[lab] for lab in sorted(labels) if lab in priors.implies and rng.random() < keep}
    for unprompted in priors.unprompted:
        if labels and rng.random() < 0.15:
            found.add(unprompted)
    return tuple(g for g in priors.vocabulary.global_labels if g in found)


def _readings(priors: Priors, truth: list[Finding], rank: int, rows: int, cols: int,
              rng: np.random.Generator) -> list[Reading]:
    """Three raters who disagree the way VinDr's do: each misses some findings and draws its own box.

    Among finding images, every fourth starts a chain of overlaps on its first finding and every fourth
    (offset by two) has one rater who calls the image normal: both kinds exist even in a tiny set.
    """
    rad_ids = [RATER_POOL[i] for i in rng.choice(len(RATER_POOL), RATERS_PER_IMAGE, replace=False)]
    boxes: list[list[Finding]] = [[] for _ in rad_ids]
    if not truth:
        return [Reading(r, (), ()) for r in rad_ids]
    silent = int(rng.integers(RATERS_PER_IMAGE)) if rank % 4 == 2 else -1
    active = [i for i in range(RATERS_PER_IMAGE) if i != silent]
    for k, finding in enumerate(truth):
        if k == 0 and rank % 4 == 0:
            for i, box in enumerate(_chain(finding.box, rows, cols)):
                boxes[i].append(Finding(finding.label, box))
            continue
        reporters = [i for i in active if rng.random() < 0.8] or [int(rng.choice(active))]
        for i in reporters:
            boxes[i].append(Finding(finding.label, _jitter(finding.box, rows, cols, rng)))
    return [Reading(r, tuple(b), _diagnoses(priors, {f.label for f in b}, rng, 0.85))
            for r, b in zip(rad_ids, boxes)]


def plan_image(seed: int, split: str, index: int, profile_index: int, *, max_side_px: int,
               no_finding_frac: float, pool: tuple[str, ...], fmt: str = "vindr") -> ImagePlan:
    """Decide one image's geometry, storage, findings and readings from (seed, split, index)."""
    priors = PRIORS[fmt]
    rng = _rng(seed, split, index, 0)
    long_side = int(rng.integers(max_side_px // 2, max_side_px + 1))
    short_side = int(long_side * rng.uniform(0.78, 0.95))
    rows, cols = (long_side, short_side) if rng.random() < 0.65 else (short_side, long_side)
    has_findings, rank = _is_finding_image(index, no_finding_frac)
    truth = _truth(priors, pool, rank, rows, cols, rng) if has_findings else []
    readings = _readings(priors, truth, rank, rows, cols, rng) if split == "train" else []
    diagnoses = _diagnoses(priors, {f.label for f in truth}, rng, 1.0)
    image_id = _image_id(seed, split, index)
    encoding = ENCODINGS[fmt][profile_index % len(ENCODINGS[fmt])]
    file = f"{split}/{image_id}.dicom" if fmt == "vindr" else f"images/{image_id}{_SUFFIX[encoding]}"
    return ImagePlan(seed, split, index, image_id, rows, cols, PROFILES[profile_index % len(PROFILES)],
                     tuple(truth), diagnoses, tuple(readings), encoding, file, priors)


def check_format(fmt: str, layout: str | None) -> str:
    """The layout to write: vindr's physionet (unless given) or kaggle; csv and coco have one, named like
    the format. ValueError for an unknown format or a vindr layout given to another format."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "vindr":
        if layout not in (None, fmt):
            raise ValueError(f"layout {layout!r} is a layout of the vindr format; format {fmt} has one layout")
        return fmt
    if (layout or "physionet") not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout or "physionet"


def plan_dataset(n_train: int, n_test: int, seed: int = 0, layout: str | None = None, *, fmt: str = "vindr",
                 max_side_px: int = 3000, no_finding_frac: float = 0.5) -> list[ImagePlan]:
    """Plans for train then test images; storage profiles and encodings cycle over the whole list."""
    layout = check_format(fmt, layout)
    if not 0.0 <= no_finding_frac < 1.0:
        raise ValueError(f"no_finding_frac must be in [0, 1), got {no_finding_frac}")
    if max_side_px < 64:
        raise ValueError(f"max_side_px must be at least 64, got {max_side_px}")
    vocabulary = PRIORS[fmt].vocabulary
    pool = tuple(c for c in KAGGLE_CLASSES if c != vocabulary.no_finding) if layout == "kaggle" \
        else vocabulary.local_labels
    kw = dict(max_side_px=max_side_px, no_finding_frac=no_finding_frac, pool=pool, fmt=fmt)
    return ([plan_image(seed, "train", i, i, **kw) for i in range(n_train)]
            + [plan_image(seed, "test", i, n_train + i, **kw) for i in range(n_test)])


# ---------------------------------------------------------------------------------------------- pixels


def _soft_ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float,
                  edge: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth rim whose width is `edge` in squared radius."""
    r2 = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    return np.clip((1.0 - r2) / edge, 0.0, 1.0)


def _chest(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A displayed-polarity chest (float32, 0 = black air, 1 = bone): body, dark lungs, bright mediastinum."""
    u = (np.arange(cols, dtype=np.float32) / cols)[None, :]
    v = (np.arange(rows, dtype=np.float32) / rows)[:, None]
    j = rng.uniform(-0.02, 0.02, 6).astype(np.float32)
    body = _soft_ellipse(u, v, 0.5 + j[0], 0.64, 0.5, 0.72, 0.2)
    lungs = (_soft_ellipse(u, v, 0.3 + j[1], 0.46 + j[2], 0.15, 0.34, 0.5)
             + _soft_ellipse(u, v, 0.7 + j[1], 0.47 + j[2], 0.14, 0.32, 0.5))
    heart = _soft_ellipse(u, v, 0.55 + j[3], 0.66 + j[4], 0.15, 0.12, 0.4)
    spine = np.exp(-(((u - 0.5 - j[0]) / 0.06) ** 2)) * np.clip(v * 6.0, 0.0, 1.0)
    ribs = np.maximum(np.cos((v - 1.2 * (u - 0.5) ** 2) * np.float32(2 * np.pi * (11.0 + 20.0 * j[5]))), 0) ** 3
    img = 0.05 + 0.42 * body - 0.28 * lungs * (1.0 - 0.3 * ribs) + 0.15 * heart + 0.15 * spine + 0.04 * v
    img += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.012)
    return img


def _pattern(k: int, dark: bool, h: int, w: int, phase: float) -> np.ndarray:
    """The texture of local label number k on an h x w box, tapered to 0 at the box edge.

    Each local label gets its own (family, frequency, angle): stripes, rings, a dot grid, spokes or an
    oriented bar, with 2-6 cycles across the box, so label and extent are both recoverable even at 224 px.
    """
    family, cycles, angle = k % 5, 2 + k // 5, np.deg2rad((k * 47) % 180)
    s = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :] - 0.5
    t = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None] - 0.5
    taper = np.clip((0.5 - np.abs(s)) / 0.12, 0, 1) * np.clip((0.5 - np.abs(t)) / 0.12, 0, 1)
    along, across = s * np.cos(angle) + t * np.sin(angle), t * np.cos(angle) - s * np.sin(angle)
    if family == 0:
        tex = np.cos(2 * np.pi * (cycles * along + phase))
    elif family == 1:
        tex = np.cos(2 * np.pi * (2 * cycles * np.sqrt(s**2 + t**2) + phase))
    elif family == 2:
        tex = np.cos(2 * np.pi * cycles * s) * np.cos(2 * np.pi * cycles * t)
    elif family == 3:
        tex = np.cos(2 * cycles * np.arctan2(t, s) + 2 * np.pi * phase)
    else:
        tex = 1.0 - 2.0 * np.clip((along / 0.5) ** 2 + (across / 0.2) ** 2, 0, 1)
    amp = (-1.0 if dark else 1.0) * (0.16 + 0.02 * (k % 3))
    return (amp * taper * (0.55 + 0.45 * tex)).astype(np.float32)


def render(plan: ImagePlan, draw_findings: bool = True) -> np.ndarray:
    """The displayed image (float32 in 0..1) of a plan; findings are drawn inside their truth boxes."""
    img = _chest(plan.rows, plan.cols, _rng(plan.seed, plan.split, plan.index, 1))
    if draw_findings:
        phases = _rng(plan.seed, plan.split, plan.index, 2).random(len(plan.truth))
        local, dark = plan.priors.vocabulary.local_labels, plan.priors.dark
        for f, phase in zip(plan.truth, phases):
            x0, y0 = int(np.floor(f.box[0])), int(np.floor(f.box[1]))
            x1, y1 = int(np.ceil(f.box[2])) + 1, int(np.ceil(f.box[3])) + 1
            img[y0:y1, x0:x1] += _pattern(local.index(f.label), f.label in dark, y1 - y0, x1 - x0, float(phase))
    return np.clip(img, 0.0, 1.0, out=img)


# ---------------------------------------------------------------------------------------------- DICOM


def _ds(value: float) -> str:
    """A DS string that always fits the 16-character limit."""
    return f"{value:.6g}"


def _voi_lut(first: int, last: int) -> Sequence:
    """A VOI LUT (16-bit output, gentle S-curve) covering modality values first..last."""
    n = last - first + 1
    t = np.linspace(0.0, 1.0, n)
    out = np.rint(65535 * (0.5 * t + 0.5 * (3 * t**2 - 2 * t**3))).astype(np.uint16)
    item = Dataset()
    item.add(DataElement(0x00283002, "US", [n, first, 16]))  # LUT Descriptor
    item.LUTExplanation = "SYNTH S-CURVE"
    item.add(DataElement(0x00283006, "US", out.tolist()))  # LUT Data
    return Sequence([item])


def _store(plan: ImagePlan, display: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Dataset]:
    """Map displayed intensities to stored values and the tags that bring them back.

    For MONOCHROME1 the stored values are inverted; the window (or LUT) always spans the used range, so a
    correct reader (modality LUT, VOI, then MONOCHROME1 inversion) shows every image with the same polarity.
    """
    p = plan.profile
    lo_range = -(1 << (p.bits_stored - 1)) if p.signed else 0
    span = (1 << p.bits_stored) - 1
    lo = lo_range + int(span * rng.uniform(0.02, 0.12))
    hi = lo_range + int(span * rng.uniform(0.80, 0.97))
    values = np.rint(lo + display * np.float32(hi - lo))
    if p.photometric == "MONOCHROME1":
        values = (hi + lo) - values
    stored = values.astype(np.int16 if p.signed else np.uint16)
    tags = Dataset()
    slope, intercept = p.rescale or (1.0, 0.0)
    if p.rescale:
        tags.RescaleSlope, tags.RescaleIntercept, tags.RescaleType = _ds(slope), _ds(intercept), "US"
    m_lo, m_hi = lo * slope + intercept, hi * slope + intercept
    center, width = (m_lo + m_hi) / 2, (m_hi - m_lo) * rng.uniform(1.0, 1.1)
    if p.window == "single":
        tags.WindowCenter, tags.WindowWidth = _ds(center), _ds(width)
    elif p.window == "multi":
        tags.WindowCenter = [_ds(center), _ds(center + 0.1 * width)]
        tags.WindowWidth = [_ds(width), _ds(0.6 * width)]
        tags.WindowCenterWidthExplanation = ["NORMAL", "HARDER"]
    elif p.window == "voi_lut":
        tags.VOILUTSequence = _voi_lut(int(np.floor(m_lo)), int(np.ceil(m_hi)))
    return stored, tags


def build_dicom(plan: ImagePlan, draw_findings: bool = True) -> Dataset:
    """The complete DICOM dataset (with file meta, possibly compressed) for one planned image."""
    p = plan.profile
    rng = _rng(plan.seed, plan.split, plan.index, 3)
    stored, tags = _store(plan, render(plan, draw_findings), rng)

    def uid(kind: str) -> UID:  # a UUID-derived UID (2.25.*), fixed by seed and image
        return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{plan.seed}:{plan.image_id}:{kind}').int}")

    sop_class = DigitalXRayImageStorageForPresentation if p.modality == "DX" else ComputedRadiographyImageStorage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if p.syntax == ImplicitVRLittleEndian \
        else ExplicitVRLittleEndian
    study_date = (date(2016, 1, 1) + timedelta(days=int(rng.integers(0, 1800)))).strftime("%Y%m%d")
    birth_date = (date(1930, 1, 1) + timedelta(days=int(rng.integers(0, 25000)))).strftime("%Y%m%d")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality = p.modality
    ds.StudyDate = ds.ContentDate = study_date
    ds.StudyTime = ds.ContentTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
    ds.AccessionNumber = f"{PHI_MARKER}{plan.index:06d}"[:16]
    ds.InstitutionName = f"{PHI_MARKER} General Hospital"
    ds.ReferringPhysicianName = f"{PHI_MARKER}^Referrer"
    ds.PatientName = f"{PHI_MARKER}^{plan.image_id[:8].upper()}"
    ds.PatientID = f"{PHI_MARKER}-{plan.image_id[:12]}"
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "F" if rng.random() < 0.5 else "M"
    ds.PatientAge = f"{int(study_date[:4]) - int(birth_date[:4]):03d}Y"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    spacing = _ds(430.0 / max(plan.rows, plan.cols))
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = p.photometric
    ds.Rows, ds.Columns = plan.rows, plan.cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, p.bits_stored, p.bits_stored - 1
    ds.PixelRepresentation = int(p.signed)
    ds.update(tags)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    if p.syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(p.syntax, stored, generate_instance_uid=False)
    return ds


def build_image(plan: ImagePlan, draw_findings: bool = True) -> Image.Image:
    """A PNG/JPEG plan's image as Pillow stores it: 8- or 16-bit grey, or RGB with equal channels."""
    display = render(plan, draw_findings)
    if plan.encoding == "png16":
        return Image.fromarray(np.rint(display * 65535.0).astype(np.uint16))
    grey = np.rint(display * 255.0).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1) if plan.encoding == "png_rgb" else grey)


def _write_image(job: tuple[ImagePlan, str, bool]) -> str:
    plan, path, draw_findings = job
    if plan.encoding == "dicom":
        build_dicom(plan, draw_findings).save_as(path, enforce_file_format=True)
    elif plan.encoding == "jpeg":
        build_image(plan, draw_findings).save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        build_image(plan, draw_findings).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------- CSVs


def _box_cells(f: Finding | None) -> list[str]:
    return [repr(c) for c in f.box] if f else ["", "", "", ""]


def _label_row(findings: tuple[Finding, ...], diagnoses: tuple[str, ...]) -> list[int]:
    present = {f.label for f in findings} | set(diagnoses) | ({VINDR_CXR.no_finding} if not findings else set())
    return [int(name in present) for name in VINDR_CXR.all_labels]


def _physionet_tables(plans: list[ImagePlan]) -> dict[str, list[list[object]]]:
    no_finding = VINDR_CXR.no_finding
    ann_header = ["image_id", "rad_id", "class_name", *BOX_COLUMNS]
    train_labels = [TRAIN_SPELLING.get(c, c) for c in VINDR_CXR.all_labels]
    tables: dict[str, list[list[object]]] = {
        "annotations/annotations_train.csv": [ann_header],
        "annotations/annotations_test.csv": [ann_header],  # rad_id present but empty: no usable rater
        "annotations/image_labels_train.csv": [["image_id", "rad_id", *train_labels]],
        "annotations/image_labels_test.csv": [["image_id", *VINDR_CXR.all_labels]],
    }
    for plan in plans:
        if plan.split == "train":
            for r in plan.readings:
                rows = [[plan.image_id, r.rad_id, f.label, *_box_cells(f)] for f in r.findings]
                tables["annotations/annotations_train.csv"] += rows or [
                    [plan.image_id, r.rad_id, no_finding, *_box_cells(None)]]
                tables["annotations/image_labels_train.csv"].append(
                    [plan.image_id, r.rad_id, *_label_row(r.findings, r.diagnoses)])
        else:
            rows = [[plan.image_id, "", f.label, *_box_cells(f)] for f in plan.truth]
            tables["annotations/annotations_test.csv"] += rows or [
                [plan.image_id, "", no_finding, *_box_cells(None)]]
            tables["annotations/image_labels_test.csv"].append(
                [plan.image_id, *_label_row(plan.truth, plan.diagnoses)])
    return tables


def _kaggle_tables(plans: list[ImagePlan]) -> dict[str, list[list[object]]]:
    no_finding = VINDR_CXR.no_finding
    rows: list[list[object]] = [["image_id", "class_name", "class_id", "rad_id", *BOX_COLUMNS]]
    for plan in plans:
        if plan.split != "train":
            continue
        for r in plan.readings:
            rows += [[plan.image_id, f.label, KAGGLE_CLASSES.index(f.label), r.rad_id, *_box_cells(f)]
                     for f in r.findings] or [
                [plan.image_id, no_finding, KAGGLE_CLASSES.index(no_finding), r.rad_id, *_box_cells(None)]]
    return {"train.csv": rows}


def _reading_rows(plan: ImagePlan, rater: str, findings: tuple[Finding, ...],
                  diagnoses: tuple[str, ...]) -> list[list[object]]:
    """One reading as box-CSV rows: its boxes, then its global labels, or one no-finding row."""
    image = plan.file
    rows = [[image, f.label, *_box_cells(f), rater, plan.split] for f in findings]
    rows += [[image, g, *_box_cells(None), rater, plan.split] for g in diagnoses]
    return rows or [[image, plan.priors.vocabulary.no_finding, *_box_cells(None), rater, plan.split]]


def _box_csv_tables(plans: list[ImagePlan]) -> dict[str, list[list[object]]]:
    """Training images: each rater's reading; test images: the consensus with an empty rater cell."""
    rows: list[list[object]] = [list(CSV_COLUMNS)]
    for plan in plans:
        if plan.split == "train":
            for r in plan.readings:
                rows += _reading_rows(plan, r.rad_id, r.findings, r.diagnoses)
        else:
            rows += _reading_rows(plan, "", plan.truth, plan.diagnoses)
    return {"annotations.csv": rows}


def _coco_files(plans: list[ImagePlan]) -> dict[str, dict]:
    """One COCO detection file per split holding the consensus boxes; ids count over both files."""
    local = PRIORS["coco"].vocabulary.local_labels
    categories = [{"id": i + 1, "name": name, "supercategory": "finding"} for i, name in enumerate(local)]
    files: dict[str, dict] = {}
    n_annotations = 0
    for image_number, plan in enumerate(plans, start=1):
        doc = files.setdefault(f"annotations/instances_{plan.split}.json", {
            "info": {"description": "synthetic chest radiographs written by litegpt synth", "version": "1.0"},
            "licenses": [], "images": [], "annotations": [], "categories": categories})
        doc["images"].append({"id": image_number, "file_name": Path(plan.file).name, "width": plan.cols,
                              "height": plan.rows})
        for f in plan.truth:
            n_annotations += 1
            x0, y0, x1, y1 = f.box
            w, h = round(x1 - x0, 2), round(y1 - y0, 2)
            doc["annotations"].append({"id": n_annotations, "image_id": image_number,
                                       "category_id": local.index(f.label) + 1, "bbox": [x0, y0, w, h],
                                       "area": round(w * h, 2), "iscrowd": 0})
    return files


def _write_csv(path: Path, rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


# ---------------------------------------------------------------------------------------------- driver


def _prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that synth did not make; clear one that it did (of any format)."""
    if out.exists() and any(out.iterdir()):
        if not (out / SENTINEL).is_file():
            raise FileExistsError(f"{out} is not empty and has no {SENTINEL}: refusing to write a synthetic "
                                  f"dataset over it (choose an empty or new --out)")
        for pattern in (*_OUTPUTS, SENTINEL):
            for old in out.glob(pattern):
                if old.is_file():
                    old.unlink()
        for folder in _FOLDERS:  # a re-run in another layout or format must not leave empty folders behind
            if (out / folder).is_dir() and not any((out / folder).iterdir()):
                (out / folder).rmdir()


def _map(jobs: list[tuple[ImagePlan, str, bool]], workers: int) -> Iterator[str]:
    if workers <= 1:
        yield from map(_write_image, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_write_image, jobs, chunksize=2)


def synthesize(out: Path, n_train: int, n_test: int, seed: int = 0, layout: str | None = None, *,
               fmt: str = "vindr", max_side_px: int = 3000, no_finding_frac: float = 0.5,
               workers: int | None = None, draw_findings: bool = True, progress: bool = True) -> Path:
    """Write a synthetic root at `out` in format `fmt` (vindr: `layout` physionet or kaggle) and return it.

    `draw_findings=False` writes the same images without the findings (same noise, same tags), which lets
    a test check independently that findings change the pixels inside their boxes and nowhere else.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("image counts must be >= 0")
    out = Path(out)
    layout = check_format(fmt, layout)
    plans = plan_dataset(n_train, n_test, seed, layout, fmt=fmt, max_side_px=max_side_px,
                         no_finding_frac=no_finding_frac)
    vocabulary = dataclasses.replace(PRIORS[fmt].vocabulary, name=out.resolve().name)  # as prepare names it
    _prepare_out(out)
    for folder in ("train", "test") if fmt == "vindr" else ("images",):
        (out / folder).mkdir(parents=True, exist_ok=True)
    what = f"VinDr-CXR-shaped data written by `litegpt synth` (layout {layout}" if fmt == "vindr" else \
        f"data in the {fmt} format written by `litegpt synth` (vocabulary in labels.yaml"
    (out / SENTINEL).write_text(
        f"Synthetic {what}, seed {seed}, {n_train} train, {n_test} test, max side {max_side_px} px). "
        f"Not patient data; every header value that looks like patient information contains {PHI_MARKER}.\n")
    jobs = [(p, str(out / p.file), draw_findings) for p in plans]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    for _ in tqdm(_map(jobs, min(workers, len(jobs))), total=len(jobs), desc="synth", unit="img",
                  disable=not progress):
        pass
    if fmt == "coco":
        for name, doc in _coco_files(plans).items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(json.dumps(doc, indent=1) + "\n")
    else:
        tables = {"kaggle": _kaggle_tables, "physionet": _physionet_tables, "csv": _box_csv_tables}[layout](plans)
        for name, rows in tables.items():
            _write_csv(out / name, rows)
    if fmt != "vindr":
        (out / "labels.yaml").write_text(yaml.safe_dump(vocabulary.to_dict(), sort_keys=False))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="root to write (new, empty, or an earlier synth)")
    parser.add_argument("--format", choices=FORMATS, default="vindr",
                        help="vindr (default): VinDr-CXR's files and labels; csv: a generic box CSV with an "
                             "NIH ChestX-ray14-like vocabulary and mixed PNG/JPEG/DICOM images; coco: COCO "
                             "detection JSON with five labels. csv and coco also write labels.yaml")
    parser.add_argument("--train", type=int, default=24, help="number of training images (default 24)")
    parser.add_argument("--test", type=int, default=8, help="number of test images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="everything follows from it (default 0)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="--format vindr only: PhysioNet VinDr-CXR v1.0.0 (default) or Kaggle VinBigData "
                             "train.csv")
    parser.add_argument("--max-side-px", type=int, default=3000,
                        help="longest image side is drawn from [max/2, max] (default 3000, like VinDr)")
    parser.add_argument("--no-finding-frac", type=float, default=0.5,
                        help="fraction of images where no rater reports anything (default 0.5)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")


def run(args: argparse.Namespace) -> int:
    try:
        layout = check_format(args.format, args.layout)
        out = synthesize(args.out, args.train, args.test, args.seed, layout, fmt=args.format,
                         max_side_px=args.max_side_px, no_finding_frac=args.no_finding_frac, workers=args.workers)
    except (ValueError, FileExistsError) as exc:
        print(f"litegpt synth: error: {exc}", file=sys.stderr)
        return 2
    shape = f"{args.format} format" + (f", {layout} layout" if layout != args.format else "")
    print(f"wrote {args.train} train + {args.test} test images ({shape}) to {out}")
    return 0
