"""Label vocabularies: which labels a dataset has, how they are spelled, and in what order they are rendered.

A vocabulary belongs to a shard set: `litegpt prepare` writes it into `manifest.json` and everything
downstream reads it from there (`Vocabulary.of_manifest`), so no other module names a label. VinDr-CXR's
vocabulary (`VINDR_CXR`) is the default, and this is the one module that spells out its labels: the
PhysioNet column order, the Kaggle class ids, and the priors `litegpt synth` draws VinDr-like images from.

- `local_labels`: findings drawn with a box, in rendering order (stage 1).
- `global_labels`: image-level labels without a box, in rendering order (stage 2); the last is always
  `no_finding`, the label of an image with nothing at all.
- `aliases`: other spellings readers accept (matched like names: case and runs of whitespace ignored).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_NO_FINDING = "No finding"
# A name must be usable in the text grammar: no tags or braces, no line breaks, at least one letter or digit.
_FORBIDDEN = re.compile(r"[<>{}\n\r\t]")


class UnknownLabel(ValueError):
    """A label name that is not in the vocabulary."""


class VocabularyError(ValueError):
    """A vocabulary (from a manifest, a YAML file or the command line) that cannot be used."""


class VocabularyMismatch(ValueError):
    """Two things that must agree (a stage and its shards, an export and its test set) use other vocabularies."""


def _key(name: str) -> str:
    return " ".join(str(name).split()).lower()


@dataclass(frozen=True)
class Vocabulary:
    name: str
    local_labels: tuple[str, ...]
    global_labels: tuple[str, ...]  # ends with no_finding
    no_finding: str = DEFAULT_NO_FINDING
    aliases: Mapping[str, str] = field(default_factory=dict)  # spelling -> canonical name

    def __post_init__(self) -> None:
        where = f"vocabulary {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise VocabularyError(f"a vocabulary needs a name, got {self.name!r}")
        if not self.local_labels:
            raise VocabularyError(f"{where}: no local labels (findings with boxes); at least one is needed")
        if not self.global_labels or self.global_labels[-1] != self.no_finding:
            raise VocabularyError(f"{where}: the global labels must end with the no-finding label "
                                  f"{self.no_finding!r}, got {list(self.global_labels)}")
        seen: dict[str, str] = {}
        for label in self.all_labels:
            if not isinstance(label, str) or label != " ".join(label.split()) or not re.search(r"\w", label) \
                    or _FORBIDDEN.search(label):
                raise VocabularyError(f"{where}: label {label!r} must be text with a letter or digit, no < > {{ }}, "
                                      "and single spaces only")
            if _key(label) in seen:
                raise VocabularyError(f"{where}: label {label!r} is given twice (as {seen[_key(label)]!r})")
            seen[_key(label)] = label
        for alias, target in self.aliases.items():
            if target not in self.all_labels:
                raise VocabularyError(f"{where}: alias {alias!r} names {target!r}, which is not one of its labels")
            if _key(alias) in seen and seen[_key(alias)] != target:
                raise VocabularyError(f"{where}: alias {alias!r} would shadow the label {seen[_key(alias)]!r}")
        object.__setattr__(self, "local_labels", tuple(self.local_labels))
        object.__setattr__(self, "global_labels", tuple(self.global_labels))
        object.__setattr__(self, "aliases", dict(self.aliases))
        # spelling key -> name, read once per annotation row by `canonical`
        object.__setattr__(self, "_names", {**seen, **{_key(a): t for a, t in self.aliases.items()}})

    @classmethod
    def build(cls, name: str, local_labels: Iterable[str], global_labels: Iterable[str] = (),
              no_finding: str = DEFAULT_NO_FINDING, aliases: Mapping[str, str] | None = None) -> Vocabulary:
        """A vocabulary from label lists as a user writes them: the no-finding label is appended if missing."""
        diseases = [g for g in global_labels if g != no_finding]
        return cls(name, tuple(local_labels), (*diseases, no_finding), no_finding, dict(aliases or {}))

    @property
    def all_labels(self) -> tuple[str, ...]:
        return self.local_labels + self.global_labels

    @property
    def diseases(self) -> tuple[str, ...]:
        """The global labels without the no-finding label."""
        return self.global_labels[:-1]

    def canonical(self, name: str) -> str:
        """A label as spelled in a dataset's files (any case, spacing or alias) -> its name here."""
        label = self._names.get(_key(name))  # type: ignore[attr-defined]
        if label is not None:
            return label
        raise UnknownLabel(f"unknown label {name!r}; {self.name} has {', '.join(self.all_labels)}")

    def describe(self) -> str:
        return f"{self.name!r} ({len(self.local_labels)} local, {len(self.global_labels)} global labels)"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "local_labels": list(self.local_labels), "global_labels": list(self.global_labels),
                "no_finding": self.no_finding, "aliases": dict(sorted(self.aliases.items()))}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Vocabulary:
        """A vocabulary as `to_dict` writes it, or as a user's YAML gives it (`global_labels` and
        `no_finding` optional); errors name `where`."""
        if not isinstance(data, Mapping):
            raise VocabularyError(f"{where}: a vocabulary is a mapping with name, local_labels, global_labels")
        unknown = sorted(set(data) - {"name", "local_labels", "global_labels", "no_finding", "aliases"})
        if unknown:
            raise VocabularyError(f"{where}: unknown key(s) {', '.join(unknown)}; expected name, local_labels, "
                                  "global_labels, no_finding, aliases")
        lists = {k: data.get(k) or [] for k in ("local_labels", "global_labels")}
        for key, value in lists.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise VocabularyError(f"{where}: {key} must be a list of names, got {value!r}")
        aliases = data.get("aliases") or {}
        if not isinstance(aliases, Mapping):
            raise VocabularyError(f"{where}: aliases must map a spelling to a label, got {aliases!r}")
        try:
            return cls.build(str(data.get("name") or ""), lists["local_labels"], lists["global_labels"],
                             str(data.get("no_finding") or DEFAULT_NO_FINDING), {str(k): str(v) for k, v in aliases.items()})
        except VocabularyError as exc:
            raise VocabularyError(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: Path) -> Vocabulary:
        """A small YAML file: name, local_labels, global_labels (optional), no_finding, aliases (optional)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise VocabularyError(f"{path}: label file not found") from None
        except yaml.YAMLError as exc:
            raise VocabularyError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any]) -> Vocabulary:
        """The vocabulary a shard set was prepared with; sets made before vocabularies were recorded are VinDr-CXR."""
        data = manifest.get("vocabulary")
        return VINDR_CXR if data is None else cls.from_dict(data, "manifest.json vocabulary")

    def require_same(self, other: Vocabulary, mine: str, theirs: str) -> None:
        """Raise VocabularyMismatch naming both sides when `other` is not this vocabulary."""
        if other != self:
            raise VocabularyMismatch(f"{mine} uses the label vocabulary {self.describe()}, but {theirs} uses "
                                     f"{other.describe()}; they must be the same")


# ---------------------------------------------------------------------------------------------- VinDr-CXR

VINDR_CXR = Vocabulary(
    name="vindr-cxr",
    # 22 local labels (findings with boxes), in the column order of the PhysioNet CSVs.
    local_labels=(
        "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
        "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
        "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
        "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
    ),
    # 6 global labels (diagnoses). The PhysioNet train CSV spells the fifth "Other diseases", test "Other disease".
    global_labels=("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other disease", DEFAULT_NO_FINDING),
    aliases={"Other diseases": "Other disease"},
)

# Kaggle "VinBigData" train.csv: class_id -> class_name (14 findings, 14 = No finding).
KAGGLE_CLASSES: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", DEFAULT_NO_FINDING,
)

# ---------------------------------------------------------------------------------------------- litegpt synth


@dataclass(frozen=True)
class SynthPrior:
    """Where `litegpt synth` puts a local label's boxes (fractions of width/height; image left = patient right)."""

    u: tuple[float, float]  # box centre, horizontal
    v: tuple[float, float]  # box centre, vertical
    w: tuple[float, float]  # box width
    h: tuple[float, float]  # box height
    mirror: bool  # occurs in either lung: reflect about the midline half of the time
    weight: float  # relative frequency


# VinDr-CXR's local labels as synth draws them: anatomical place, and frequency roughly as in the release.
VINDR_CXR_SYNTH_PRIORS: dict[str, SynthPrior] = {
    "Aortic enlargement": SynthPrior((0.52, 0.58), (0.28, 0.36), (0.08, 0.14), (0.07, 0.12), False, 7.0),
    "Atelectasis": SynthPrior((0.25, 0.35), (0.55, 0.72), (0.08, 0.18), (0.06, 0.14), True, 0.3),
    "Calcification": SynthPrior((0.22, 0.38), (0.25, 0.70), (0.03, 0.07), (0.03, 0.06), True, 1.0),
    "Cardiomegaly": SynthPrior((0.50, 0.56), (0.60, 0.70), (0.32, 0.46), (0.14, 0.22), False, 5.5),
    "Clavicle fracture": SynthPrior((0.25, 0.35), (0.12, 0.18), (0.06, 0.12), (0.04, 0.07), True, 0.1),
    "Consolidation": SynthPrior((0.24, 0.36), (0.40, 0.70), (0.10, 0.20), (0.10, 0.20), True, 0.6),
    "Edema": SynthPrior((0.30, 0.36), (0.40, 0.60), (0.16, 0.24), (0.20, 0.32), True, 0.1),
    "Emphysema": SynthPrior((0.26, 0.34), (0.22, 0.40), (0.14, 0.22), (0.15, 0.25), True, 0.2),
    "Enlarged PA": SynthPrior((0.56, 0.60), (0.40, 0.46), (0.05, 0.09), (0.05, 0.09), False, 0.3),
    "ILD": SynthPrior((0.26, 0.34), (0.50, 0.70), (0.14, 0.22), (0.18, 0.30), True, 1.0),
    "Infiltration": SynthPrior((0.24, 0.36), (0.30, 0.70), (0.10, 0.20), (0.10, 0.20), True, 1.2),
    "Lung Opacity": SynthPrior((0.22, 0.38), (0.30, 0.72), (0.06, 0.20), (0.06, 0.20), True, 2.5),
    "Lung cavity": SynthPrior((0.24, 0.36), (0.22, 0.45), (0.05, 0.10), (0.05, 0.10), True, 0.1),
    "Lung cyst": SynthPrior((0.22, 0.38), (0.30, 0.65), (0.05, 0.10), (0.05, 0.10), True, 0.1),
    "Mediastinal shift": SynthPrior((0.48, 0.52), (0.35, 0.50), (0.12, 0.20), (0.30, 0.45), False, 0.15),
    "Nodule/Mass": SynthPrior((0.20, 0.38), (0.25, 0.70), (0.03, 0.09), (0.03, 0.09), True, 2.6),
    "Pleural effusion": SynthPrior((0.17, 0.23), (0.74, 0.80), (0.12, 0.20), (0.08, 0.16), True, 2.5),
    "Pleural thickening": SynthPrior((0.15, 0.19), (0.20, 0.55), (0.04, 0.09), (0.08, 0.20), True, 4.8),
    "Pneumothorax": SynthPrior((0.20, 0.26), (0.22, 0.42), (0.10, 0.18), (0.15, 0.28), True, 0.25),
    "Pulmonary fibrosis": SynthPrior((0.24, 0.36), (0.22, 0.50), (0.10, 0.20), (0.10, 0.20), True, 4.6),
    "Rib fracture": SynthPrior((0.16, 0.22), (0.30, 0.65), (0.04, 0.08), (0.03, 0.06), True, 0.1),
    "Other lesion": SynthPrior((0.20, 0.80), (0.20, 0.80), (0.04, 0.15), (0.04, 0.15), False, 2.2),
}
# A rater who reports the finding usually also reports the diagnosis it suggests.
VINDR_CXR_IMPLIES: dict[str, str] = {
    "Emphysema": "COPD", "Nodule/Mass": "Lung tumor", "Consolidation": "Pneumonia",
    "Infiltration": "Pneumonia", "Lung Opacity": "Pneumonia", "Lung cavity": "Tuberculosis",
    "Pulmonary fibrosis": "Tuberculosis",
}
# Findings that are radiolucent (darker than their surroundings) on a displayed radiograph.
VINDR_CXR_DARK: frozenset[str] = frozenset({"Emphysema", "Lung cavity", "Lung cyst", "Pneumothorax"})

# The vocabularies of `litegpt synth --format csv` (NIH ChestX-ray14-like) and `--format coco` (detection
# only), in sorted-name order, which is the order `litegpt prepare` infers from the files.
SYNTH_CSV = Vocabulary.build(
    "synth-csv",
    ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax"),
    ("Emphysema", "Fibrosis", "Hernia"),
)
SYNTH_COCO = Vocabulary.build("synth-coco", ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax"))
