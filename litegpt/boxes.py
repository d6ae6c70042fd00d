"""Box geometry: IoU and the order-independent grouping of overlapping boxes (paper 4.2).

The paper keeps one representative of boxes of one class whose pairwise IoU exceeds 0.5. The authors'
code groups in pair order, so its result depends on the CSV's row order; here a group is a connected
component of the "IoU > threshold" graph, and the representative is chosen by a rule that does not
depend on order either.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of continuous boxes (area = width * height, no +1 pixel convention)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def overlap_groups(boxes: Sequence[Box], threshold: float = 0.5) -> list[list[int]]:
    """Connected components of the graph joining boxes with IoU > threshold.

    Components are returned sorted by their smallest box (lexicographic), members sorted by box, so the
    output describes the same partition whatever the input order.
    """
    n = len(boxes)
    if n == 0:
        return []
    adjacent = iou_matrix(boxes, boxes) > threshold
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adjacent, k=1))):
        parent[find(int(i))] = find(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    members = [sorted(g, key=lambda i: (tuple(boxes[i]), i)) for g in groups.values()]
    return sorted(members, key=lambda g: tuple(boxes[g[0]]))


def representative(boxes: Sequence[Box], method: str = "medoid") -> Box:
    """One box standing for a group of overlapping boxes.

    `medoid`: the input box with the highest summed IoU to the others (ties: the smallest box in
    lexicographic order), so the result is a box a radiologist actually drew. `mean`: coordinate-wise mean.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if method == "mean":
        return tuple(float(v) for v in arr.mean(axis=0))  # type: ignore[return-value]
    if method != "medoid":
        raise ValueError(f"unknown box merge method {method!r}; expected 'medoid' or 'mean'")
    scores = iou_matrix(arr, arr).sum(axis=1)
    best = max(range(len(arr)), key=lambda i: (round(float(scores[i]), 12), tuple(-arr[i])))
    return tuple(float(v) for v in arr[best])  # type: ignore[return-value]


def merge_overlapping(boxes: Sequence[Box], threshold: float = 0.5, method: str = "medoid") -> list[Box]:
    """Replace every group of overlapping boxes by its representative; sorted, order-independent."""
    groups = overlap_groups(boxes, threshold)
    return sorted(representative([boxes[i] for i in g], method) for g in groups)
