"""Overlap grouping and label policies, checked against brute-force computations written here."""

from __future__ import annotations

import itertools
import random

import pytest

from litegpt.boxes import iou_matrix, merge_overlapping, overlap_groups
from litegpt.data.policy import Conflict, PolicyConfig, apply_policy
from litegpt.data.sources import Annotation, ImageRecord
from litegpt.labels import VINDR_CXR, Vocabulary


def iou_by_hand(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_iou_matches_hand_computation():
    rng = random.Random(0)
    boxes = []
    for _ in range(30):
        x, y = rng.uniform(0, 100), rng.uniform(0, 100)
        boxes.append((x, y, x + rng.uniform(1, 50), y + rng.uniform(1, 50)))
    matrix = iou_matrix(boxes, boxes)
    for i, j in itertools.product(range(30), repeat=2):
        assert matrix[i, j] == pytest.approx(iou_by_hand(boxes[i], boxes[j]))


CHAIN = [(0, 0, 10, 10), (3, 0, 13, 10), (6, 0, 16, 10)]  # A~B (0.54), B~C (0.54), A!~C (0.25)


def test_chain_gives_one_box_for_every_input_order():
    assert iou_by_hand(CHAIN[0], CHAIN[1]) > 0.5 and iou_by_hand(CHAIN[0], CHAIN[2]) < 0.5
    results = {tuple(merge_overlapping(list(p))) for p in itertools.permutations(CHAIN)}
    assert results == {((3.0, 0.0, 13.0, 10.0),)}  # the medoid: B overlaps both others
    means = {tuple(merge_overlapping(list(p), method="mean")) for p in itertools.permutations(CHAIN)}
    assert means == {((3.0, 0.0, 13.0, 10.0),)}


def brute_force_components(boxes, threshold):
    """Reachability by repeated expansion, independent of the union-find in litegpt.boxes."""
    remaining, comps = set(range(len(boxes))), []
    while remaining:
        frontier = {min(remaining)}
        comp = set()
        while frontier:
            i = frontier.pop()
            comp.add(i)
            frontier |= {j for j in remaining - comp if iou_by_hand(boxes[i], boxes[j]) > threshold}
        remaining -= comp
        comps.append(frozenset(boxes[i] for i in comp))
    return set(comps)


@pytest.mark.parametrize("seed", range(5))
def test_groups_are_connected_components_in_any_order(seed):
    rng = random.Random(seed)
    boxes = []
    for _ in range(12):
        x, y = rng.choice([0, 5, 40]) + rng.uniform(0, 4), rng.uniform(0, 4)
        boxes.append((x, y, x + 10, y + 10))
    expected = brute_force_components(boxes, 0.5)
    for _ in range(5):
        rng.shuffle(boxes)
        got = {frozenset(boxes[i] for i in g) for g in overlap_groups(boxes, 0.5)}
        assert got == expected


def record(rows, global_labels=None, consensus=False):
    annotations = [Annotation(r, lab, box, "annotations_train.csv", i + 2) for i, (r, lab, box) in enumerate(rows)]
    return ImageRecord("img", "train", None, annotations, global_labels, consensus)


CARDIO = (100.0, 200.0, 300.0, 400.0)


def test_drop_policy_removes_conflicts_and_union_keeps_them():
    rows = [("R1", "No finding", None), ("R2", "Cardiomegaly", CARDIO), ("R3", "Cardiomegaly", CARDIO)]
    with pytest.raises(Conflict, match="R1 found nothing"):
        apply_policy(record(rows), PolicyConfig("drop"), VINDR_CXR)
    union = apply_policy(record(rows), PolicyConfig("union"), VINDR_CXR)
    assert union.findings == [("Cardiomegaly", CARDIO)] and union.diagnoses == []
    majority = apply_policy(record(rows), PolicyConfig("majority"), VINDR_CXR)
    assert majority.findings == [("Cardiomegaly", CARDIO)]


def test_majority_needs_two_of_three_and_global_labels_follow_the_policy():
    other = (500.0, 500.0, 600.0, 600.0)
    rows = [("R1", "Cardiomegaly", CARDIO), ("R2", "Cardiomegaly", CARDIO), ("R3", "Nodule/Mass", other)]
    globals_ = {"R1": {"Pneumonia"}, "R2": {"Pneumonia", "COPD"}, "R3": set()}
    majority = apply_policy(record(rows, globals_), PolicyConfig("majority"), VINDR_CXR)
    assert [f[0] for f in majority.findings] == ["Cardiomegaly"] and majority.diagnoses == ["Pneumonia"]
    drop = apply_policy(record(rows, globals_), PolicyConfig("drop"), VINDR_CXR)
    assert [f[0] for f in drop.findings] == ["Cardiomegaly", "Nodule/Mass"]
    assert drop.diagnoses == ["COPD", "Pneumonia"]  # the vocabulary's global label order


def test_all_raters_no_finding_gives_no_finding_and_consensus_keeps_boxes():
    rows = [(r, "No finding", None) for r in ("R1", "R2", "R3")]
    labels = apply_policy(record(rows), PolicyConfig("drop"), VINDR_CXR)
    assert labels.findings == [] and labels.diagnoses == ["No finding"] and labels.n_raters == 3
    near = (101.0, 200.0, 300.0, 400.0)  # overlaps CARDIO, but consensus boxes are taken as given
    consensus = apply_policy(record([("consensus", "Cardiomegaly", CARDIO), ("consensus", "Cardiomegaly", near)],
                                    consensus=True), PolicyConfig("drop"), VINDR_CXR)
    assert len(consensus.findings) == 2


def test_bad_policy_names_are_refused():
    with pytest.raises(ValueError, match="unknown label policy"):
        PolicyConfig("vote")


def test_policy_follows_the_vocabulary_order_and_no_finding_label():
    vocabulary = Vocabulary.build("mine", ["Zeta", "Alpha"], ["Beta", "Aardvark"], "Normal")
    rows = [("R1", "Alpha", CARDIO), ("R1", "Zeta", CARDIO), ("R2", "Alpha", CARDIO), ("R2", "Zeta", CARDIO)]
    labels = apply_policy(record(rows, {"R1": {"Aardvark", "Beta"}, "R2": {"Beta"}}), PolicyConfig("union"), vocabulary)
    assert [f[0] for f in labels.findings] == ["Zeta", "Alpha"] and labels.diagnoses == ["Beta", "Aardvark"]
    nothing = apply_policy(record([("R1", "Normal", None)]), PolicyConfig("drop"), vocabulary)
    assert nothing.findings == [] and nothing.diagnoses == ["Normal"]
