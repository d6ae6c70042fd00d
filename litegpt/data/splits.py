"""The validation images of a shard set: an explicit `val` split, or a share of the training split carved
out by a hash of each `image_id`.

The carve depends on the id alone (sha256 of its UTF-8 bytes read as a number in [0, 1), below the
fraction), not on shard layout, sample order, seed or world size: re-preparing the shards with other shard
sizes, or training on another number of ranks, holds out the same images, and raising the fraction only
adds images to the held-out set. Training and validation read the same `Holdout`, so no image is in both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

VALIDATION_SPLIT = "val"  # a shard set's explicit validation split, when its manifest has one


def hash_share(image_id: str) -> float:
    """Where `image_id` falls in [0, 1): the first 8 bytes of its sha256, big-endian, over 2**64."""
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Holdout:
    """Where the validation images are: all of `split` (`fraction` None: an explicit validation split), or the
    images of `split` whose `hash_share` is below `fraction` (carved from the training split)."""

    split: str
    fraction: float | None = None

    def holds(self, image_id: str) -> bool:
        """Whether an image of `self.split` is a validation image."""
        return self.fraction is None or hash_share(image_id) < self.fraction

    def trains(self, split: str, image_id: str) -> bool:
        """Whether an image of the training split `split` may be trained on (it is not held out)."""
        return split != self.split or not self.holds(image_id)

    def record(self) -> dict:
        """As the run records it (its checkpoints' data record)."""
        return {"split": self.split, "fraction": self.fraction}


def choose_holdout(splits: dict, train_split: str, fraction: float) -> Holdout | None:
    """The validation images for training on `train_split` of a set whose manifest lists `splits`
    ({name: {"samples": n}}): its explicit validation split, else `fraction` of `train_split`, else none.

    Raises ValueError when both are asked for, or when the training split is the validation split.
    """
    explicit = splits.get(VALIDATION_SPLIT, {}).get("samples", 0) > 0
    if explicit and train_split == VALIDATION_SPLIT:
        raise ValueError(f"the training split is the validation split {VALIDATION_SPLIT!r}")
    if explicit and fraction > 0:
        raise ValueError(f"the shards have an explicit {VALIDATION_SPLIT!r} split, and a nonzero fraction would carve "
                         f"a second validation set from {train_split!r}: use one of them")
    if explicit:
        return Holdout(VALIDATION_SPLIT)
    return Holdout(train_split, fraction) if fraction > 0 else None
