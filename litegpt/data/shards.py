"""The shard set on disk: atomic tar writing, the manifest, and reading samples back.

Layout (DESIGN.md, "Shard sample"): `<dir>/<split>-%06d.tar` WebDataset tars whose samples are keyed by
VinDr `image_id` with a `png` and a `json` member, and `<dir>/manifest.json` describing them. A tar only
ever appears under its final name once completely written, so a killed run never leaves a shard that
looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

MANIFEST = "manifest.json"
FORMAT = "litegpt-shards/1"
SPLITS = ("train", "test")


class ShardError(ValueError):
    """A shard directory that is missing, incomplete or does not match its manifest."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Sample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, e.g. {"png": ..., "json": ...}


def write_shard(path: Path, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write samples to `path` atomically (temp name, fsync, rename); returns (count, sha256).

    Plain tarfile (what webdataset's TarWriter wraps) keeps torch out of the workers' imports; fixed mtime,
    owner and mode make the bytes depend on the samples alone.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=(fh := _HashingWriter(raw)), mode="w",
                                                  format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uname = info.gname = "litegpt"
                    tar.addfile(info, io.BytesIO(data))
                count += 1
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count, fh.digest.hexdigest()


class _HashingWriter:
    """A write-only file that hashes what passes through, so a shard is not read back to hash it."""

    def __init__(self, raw) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory}: no {MANIFEST}; it is written last, so the shard set is missing or incomplete "
                         f"(run `litegpt prepare` to build or finish it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from None


def shard_paths(directory: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The shard files of one split, as listed in the manifest, checked to exist."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    paths = [directory / s["name"] for s in manifest["shards"] if s["split"] == split]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ShardError(f"{directory}: manifest lists shard(s) that do not exist: {', '.join(missing)}")
    return paths


def iter_samples(directory: Path, split: str) -> Iterator[dict]:
    """Every sample of a split in shard order, decoded: {"__key__", "png": PIL image (L), "json": dict}."""
    paths = shard_paths(directory, split)
    if not paths:
        return iter(())
    import webdataset as wds  # imports torch: only where samples are read

    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False).decode("pill")
    return iter(dataset)


def png_bytes(pixels, compress_level: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def iter_json(path: Path) -> Iterator[dict]:
    """The `json` member of every sample of one tar, without decoding images."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())
