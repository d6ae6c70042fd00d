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
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Container, Iterable, Iterator

from litegpt.files import atomic_file, write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "litegpt-shards/1"
SPLITS = ("train", "test")
PARTIAL = ".partial"
INPUTS = "inputs_sha256"


class ShardError(ValueError):
    """A shard directory that is missing, incomplete or does not match its manifest."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class Sample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, e.g. {"png": ..., "json": ...}


def write_shard(path: Path, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write samples to `path` atomically (temp name, fsync, rename); returns (count, sha256).

    Members are named `<key>.<extension>` (what `iter_tar` splits), so a key may not contain a dot.
    Plain tarfile (what webdataset's TarWriter wraps) keeps torch out of the workers' imports; fixed mtime,
    owner and mode make the bytes depend on the samples alone.
    """
    count = 0
    with atomic_file(path) as raw, tarfile.open(fileobj=(fh := _HashingWriter(raw)), mode="w",
                                                format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if "." in sample.key:
                raise ValueError(f"shard sample key {sample.key!r} contains a dot")
            for ext, data in sample.members.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "litegpt"
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count, fh.digest.hexdigest()


class _HashingWriter:
    """A write-only file that hashes what passes through, so a shard is not read back to hash it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


def iter_tar(path: Path, extensions: Container[str] | None = None) -> Iterator[Sample]:
    """The samples of one tar in order, split back into key and members as `write_shard` joined them.

    With `extensions`, only those members are read (the others are skipped unread, e.g. PNGs when only the
    json is wanted).
    """
    key, members = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name_key, _, ext = member.name.partition(".")
            if name_key != key:
                if key is not None:
                    yield Sample(key, members)
                key, members = name_key, {}
            if extensions is None or ext in extensions:
                members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield Sample(key, members)


def read_samples(paths: Iterable[Path]) -> Iterator[dict]:
    """Undecoded samples of several tars in order, as webdataset spells them: {"__key__": key, ext: bytes}."""
    for path in paths:
        for sample in iter_tar(path):
            yield {"__key__": sample.key, **sample.members}


def iter_json(path: Path) -> Iterator[dict]:
    """The `json` member of every sample of one tar, without reading images."""
    for sample in iter_tar(path, extensions={"json"}):
        yield json.loads(sample.members["json"])


class ShardSetWriter:
    """Writes a shard set so that an interrupted run resumes and only a finished one looks complete.

    Each shard's record (a dict with its "name") goes to `.partial/<name>.json` as soon as the shard is
    written; `finish` writes manifest.json, which lists them, last. `inputs`, a digest of what the shards are
    made from, is kept beside the records (`.partial/inputs_sha256`) and in the manifest (`inputs_sha256`),
    so records made from other inputs are never reused; None where the directory is named by that digest.
    Several processes may write shards of one set (`begin`, then `add`); one of them calls `finish`.
    """

    def __init__(self, directory: Path, inputs: str | None = None,
                 manifest_records: Callable[[dict], Iterable[dict]] = lambda manifest: manifest["shards"]):
        self.directory, self.inputs, self.manifest_records = Path(directory), inputs, manifest_records
        self.partial = self.directory / PARTIAL

    def records(self) -> dict[str, dict]:
        """Records of the shards earlier runs wrote from the same inputs: the manifest's, then those since."""
        records: dict[str, dict] = {}
        manifest = self.directory / MANIFEST
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            if self.inputs is None or old.get(INPUTS) == self.inputs:
                records.update({r["name"]: r for r in self.manifest_records(old)})
        stamp = self.partial / INPUTS
        if self.inputs is None or (stamp.is_file() and stamp.read_text() == self.inputs):
            for path in sorted(self.partial.glob("*.json")):
                record = json.loads(path.read_text())
                records[record["name"]] = record
        return records

    def begin(self, keep: Iterable[dict]) -> None:
        """Before shards are written: the set stops looking complete, keeping the records in `keep`."""
        self.partial.mkdir(parents=True, exist_ok=True)
        if self.inputs is not None:
            write_bytes_atomic(self.partial / INPUTS, self.inputs.encode())
        if (self.directory / MANIFEST).is_file():
            for record in keep:
                self.add(record)
            (self.directory / MANIFEST).unlink(missing_ok=True)

    def add(self, record: dict) -> None:
        """Record a shard just written."""
        write_json_atomic(self.partial / f"{record['name']}.json", record)

    def clear_stale(self, keep: Container[str]) -> None:
        """Remove shards, temp files and records not named in `keep`; only while no other process writes."""
        for path in self.directory.glob("*.tar"):
            if path.name not in keep:
                path.unlink()
        for path in self.directory.glob(".*.tmp"):
            path.unlink()
        for path in self.partial.glob("*.json"):
            if path.stem not in keep:
                path.unlink()

    def finish(self, manifest: dict) -> None:
        """Write the manifest, which lists every shard of the set, and remove what it does not list."""
        self.clear_stale({s["name"] for s in manifest["shards"]})
        write_json_atomic(self.directory / MANIFEST, manifest)
        shutil.rmtree(self.partial, ignore_errors=True)


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
    from PIL import Image

    for raw in read_samples(shard_paths(directory, split)):
        with Image.open(io.BytesIO(raw["png"])) as image:
            yield {"__key__": raw["__key__"], "png": image.convert("L"), "json": json.loads(raw["json"])}


def png_bytes(pixels, compress_level: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
