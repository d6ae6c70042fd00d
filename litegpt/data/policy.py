"""Label policy: from several radiologists' annotations of one image to the one set of labels we train on.

Paper 4.2: images where raters conflict (one finds nothing, another gives findings) are removed
(`drop`, the default). `union` is what the authors' code does; `majority` keeps a label when most raters
gave it. Overlapping boxes of one class (IoU > threshold) become one representative box. Consensus
labels (PhysioNet test split) are taken as given.
"""

from __future__ import annotations

from dataclasses import dataclass

from litegpt.boxes import Box, merge_overlapping
from litegpt.data.sources import ImageRecord
from litegpt.labels import Vocabulary

POLICIES = ("drop", "union", "majority")


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "drop"
    iou_threshold: float = 0.5
    box_merge: str = "medoid"  # or "mean"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown label policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.box_merge not in ("medoid", "mean"):
            raise ValueError(f"unknown box merge {self.box_merge!r}; expected medoid or mean")


@dataclass(frozen=True)
class Labels:
    """The labels of one image after the policy; boxes still in original pixels."""

    findings: list[tuple[str, Box]]  # sorted by (the vocabulary's label order, box)
    diagnoses: list[str]  # global labels in the vocabulary's order; [no-finding label] when nothing at all
    n_raters: int


class Conflict(ValueError):
    """Raters disagree in a way the `drop` policy removes."""


def apply_policy(record: ImageRecord, cfg: PolicyConfig, vocabulary: Vocabulary) -> Labels:
    """Combine the raters of `record` (labels of `vocabulary`); raises Conflict when the `drop` policy
    removes the image."""
    raters = sorted({a.rater for a in record.annotations} | set(record.global_labels or {}))
    local = {r: {a.label for a in record.annotations if a.rater == r and a.box is not None} for r in raters}
    diseases = {r: (record.global_labels or {}).get(r, set()) - {vocabulary.no_finding} for r in raters}
    says_nothing = [r for r in raters if not local[r] and not diseases[r]]
    says_something = [r for r in raters if local[r] or diseases[r]]

    if record.consensus or cfg.policy == "union":
        kept_local = set().union(*local.values()) if local else set()
        kept_global = set().union(*diseases.values()) if diseases else set()
    elif cfg.policy == "drop":
        if says_nothing and says_something:
            raise Conflict(
                f"raters conflict: {', '.join(says_nothing)} found nothing, {', '.join(says_something)} gave findings"
            )
        kept_local = set().union(*local.values()) if local else set()
        kept_global = set().union(*diseases.values()) if diseases else set()
    else:  # majority
        need = len(raters) // 2 + 1
        kept_local = {lab for lab in vocabulary.local_labels if sum(lab in s for s in local.values()) >= need}
        kept_global = {lab for lab in vocabulary.diseases if sum(lab in s for s in diseases.values()) >= need}

    findings: list[tuple[str, Box]] = []
    for label in vocabulary.local_labels:
        if label not in kept_local:
            continue
        boxes = [a.box for a in record.annotations if a.label == label and a.box is not None]
        if record.consensus:
            findings.extend((label, b) for b in sorted(boxes))
        else:
            findings.extend((label, b) for b in merge_overlapping(boxes, cfg.iou_threshold, cfg.box_merge))
    diagnoses = [g for g in vocabulary.global_labels if g in kept_global]
    if not findings and not diagnoses:
        diagnoses = [vocabulary.no_finding]
    return Labels(findings, diagnoses, len(raters))
