"""The VinDr-CXR label vocabulary: one place for names, spellings and the Kaggle class ids."""

from __future__ import annotations

# 22 local labels (findings with boxes), in the column order of the PhysioNet CSVs.
LOCAL_LABELS: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
NO_FINDING = "No finding"
# 6 global labels (diagnoses). The PhysioNet train CSV spells the fifth "Other diseases", test "Other disease".
GLOBAL_LABELS: tuple[str, ...] = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other disease", NO_FINDING)
ALL_LABELS: tuple[str, ...] = LOCAL_LABELS + GLOBAL_LABELS

# Kaggle "VinBigData" train.csv: class_id -> class_name (14 findings, 14 = No finding).
KAGGLE_CLASSES: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", NO_FINDING,
)

_ALIASES = {"other diseases": "Other disease"}
_CANONICAL = {name.lower(): name for name in ALL_LABELS}


class UnknownLabel(ValueError):
    """A label name that is not in the VinDr-CXR vocabulary."""


def canonical_label(name: str) -> str:
    """Map a label as spelled in any VinDr CSV (case, 'Other diseases') to its canonical name."""
    key = " ".join(str(name).split()).lower()
    key = _ALIASES.get(key, key).lower()
    try:
        return _CANONICAL[key]
    except KeyError:
        raise UnknownLabel(f"unknown label {name!r}; expected one of {', '.join(ALL_LABELS)}") from None
