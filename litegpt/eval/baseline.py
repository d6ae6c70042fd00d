"""The training-prior baseline: one fixed answer per task, whatever the image.

A model that does not look at the image can at best learn the training prior, so beating this baseline
on the same metrics is the evidence that it does. The prior is read from the training split's shard
json (no image is decoded):

- `[identify]`: the local labels present in more than half of the training images with findings (at
  least the most frequent one), each with the mean of its training boxes; the denominator is images with
  findings because stage 1 trains on those only.
- `[vqa]`: the global labels present in more than half of all training images (at least the most frequent
  one). "More than half" keeps the no-finding label exclusive: an image that has it has no other diagnosis.

The answers and targets are written in the shard set's grammar (its manifest's vocabulary and template).
Its records are `metrics.Prediction`s, so `compute_metrics` scores it exactly as it scores a model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from litegpt.data.shards import iter_json, read_manifest, shard_paths
from litegpt.eval.metrics import Prediction
from litegpt.grammar import TASKS, Grammar


@dataclass(frozen=True)
class Prior:
    findings: tuple[tuple[str, tuple[float, ...]], ...]  # (local label, mean normalised box)
    diagnoses: tuple[str, ...]

    def answer(self, task: str, grammar: Grammar) -> str:
        return grammar.findings(self.findings) if task == "identify" else grammar.diagnoses(self.diagnoses)


def split_json(shards: Path, split: str) -> Iterator[dict]:
    """The json of every sample of a split, in shard order."""
    for path in shard_paths(Path(shards), split):
        yield from iter_json(path)


def _frequent(counts: Counter, n: int) -> list[str]:
    """Labels counted in more than half of n images; the most frequent one if none is."""
    chosen = [label for label, c in counts.items() if 2 * c > n]
    return chosen or [counts.most_common(1)[0][0]]


def fit_prior(samples: Iterable[dict]) -> Prior:
    """The prior of a training split's sample json (see the module doc)."""
    images = list(samples)
    with_findings = [s for s in images if s["findings"]]
    if not with_findings:
        raise ValueError("the training split has no image with findings: no local prior to fit")
    local = Counter(label for s in with_findings for label in {f["label"] for f in s["findings"]})
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for s in with_findings:
        for f in s["findings"]:
            boxes[f["label"]].append(f["box"])
    findings = tuple((label, tuple(float(v) for v in np.mean(boxes[label], axis=0)))
                     for label in _frequent(local, len(with_findings)))
    diagnoses = tuple(_frequent(Counter(d for s in images for d in set(s["diagnoses"])), len(images)))
    return Prior(findings, diagnoses)


def prior_predictions(prior: Prior, samples: Iterable[dict], grammar: Grammar,
                      tasks: Sequence[str] = TASKS) -> list[Prediction]:
    """One record per sample and task, answering the prior's fixed text."""
    answers = {task: prior.answer(task, grammar) for task in tasks}
    return [Prediction(image_id=s["image_id"], task=task, output=answers[task], target=grammar.answer(task, s),
                       gt_findings=s["findings"], gt_diagnoses=s["diagnoses"])
            for s in samples for task in tasks]


def baseline(shards: Path, train: str = "train", test: str = "test") -> tuple[Grammar, list[Prediction]]:
    """The prior fitted on a shard set's `train` split answering its `test` split, and the set's grammar, the
    one to score the records with."""
    grammar = Grammar.from_record(read_manifest(shards))
    return grammar, prior_predictions(fit_prior(split_json(shards, train)), split_json(shards, test), grammar)
