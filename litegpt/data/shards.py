"""The shard set on disk: atomic tar writing, the manifest, and reading samples back.

Layout (DESIGN.md, "Shard sample"): `<dir>/<split>-%06d.tar` WebDataset tars whose samples are keyed by
VinDr `image_id` with a `png` and a `json` member, and `<dir>/manifest.json` describing them. A tar only
ever appears under its final name once completely written, so a killed run never leaves a shard that
looks complete.

Member names are `<tar key>.<extension>`; a reader (ours, webdataset) takes the key up to the first dot.
The tar key is the sample key with every UTF-8 byte outside `A-Z a-z 0-9 _ -` written as `%XX`
(`tar_key`), so any key a file name can hold round-trips (dots of DICOM UIDs, spaces, `/`, unicode, `%`)
and VinDr's hex ids are their own tar keys. Tars are PAX, so long names need no USTAR 100-character
limit; a tar whose names fit USTAR is byte for byte a USTAR tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import string
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Container, Iterable, Iterator
from urllib.parse import unquote

from litegpt.files import atomic_file, temp_name, write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "litegpt-shards/1"
SPLITS = ("train", "test")
PARTIAL = ".partial"
INPUTS = "inputs_sha256"
SHARD_NAME = re.compile(rf"(?:{'|'.join(SPLITS)})-[0-9]{{6}}\.tar")
_KEY_SAFE = frozenset(string.ascii_letters + string.digits + "_-")


class ShardError(ValueError):
    """A shard directory that is missing, incomplete or does not match its manifest."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_key(key: str) -> str:
    """The key as it is spelled in member names: no dot, slash or non-ASCII, reversible by `unquote`.

    surrogateescape: a file name that is not UTF-8 (Python holds its bytes as lone surrogates) round-trips too.
    """
    return "".join(c if c in _KEY_SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
                   for c in key)


def sample_key(name: str) -> str:
    """The key a `tar_key` spells."""
    return unquote(name, encoding="utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class Sample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, e.g. {"png": ..., "json": ...}


def write_shard(path: Path, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write samples to `path` atomically (temp name, fsync, rename); returns (count, sha256).

    Members are named `<tar_key(key)>.<extension>` (what `iter_tar` splits). Plain tarfile (what
    webdataset's TarWriter wraps) keeps torch out of the workers' imports; fixed mtime, owner and mode
    make the bytes depend on the samples alone. An OSError (a full disk) names `path`.
    """
    count = 0
    try:
        with atomic_file(path) as raw, tarfile.open(fileobj=(fh := _HashingWriter(raw)), mode="w",
                                                    format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                name = tar_key(sample.key)
                for ext, data in sample.members.items():
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uname = info.gname = "litegpt"
                    tar.addfile(info, io.BytesIO(data))
                count += 1
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
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
    """The samples of one tar in order, split back into (original) key and members as `write_shard` joined them.

    With `extensions`, only those members are read (the others are skipped unread, e.g. PNGs when only the
    json is wanted).
    """
    key, members = None, {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, _, ext = member.name.partition(".")
                if name_key != key:
                    if key is not None:
                        yield Sample(sample_key(key), members)
                    key, members = name_key, {}
                if extensions is None or ext in extensions:
                    members[ext] = tar.extractfile(member).read()
    except tarfile.TarError as exc:  # damaged after it was verified (or never verified): name the file
        raise ShardError(f"{path}: not a readable shard tar ({exc}); `litegpt inspect {Path(path).parent}` checks "
                         "the set and prints the command that repairs it") from None
    if key is not None:
        yield Sample(sample_key(key), members)


def read_samples(paths: Iterable[Path]) -> Iterator[dict]:
    """Undecoded samples of several tars in order, as webdataset spells them:
    {"__key__": key, "__url__": the tar's path, ext: bytes}."""
    for path in paths:
        for sample in iter_tar(path):
            yield {"__key__": sample.key, "__url__": str(path), **sample.members}


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
    Only the writer's own files are ever deleted: shard names (`SHARD_NAME`), their and the manifest's
    temporary files, and `.partial/`; whatever else is in the directory is left alone.
    """

    def __init__(self, directory: Path, inputs: str | None = None,
                 manifest_records: Callable[[dict], Iterable[dict]] = lambda manifest: manifest["shards"]):
        self.directory, self.inputs, self.manifest_records = Path(directory), inputs, manifest_records
        self.partial = self.directory / PARTIAL

    def records(self) -> dict[str, dict]:
        """Records of the shards earlier runs wrote from the same inputs: the manifest's, then those since."""
        records: dict[str, dict] = {}
        if (self.directory / MANIFEST).is_file():
            old = read_manifest(self.directory)
            if self.inputs is None or old.get(INPUTS) == self.inputs:
                records.update({r["name"]: r for r in self.manifest_records(old)})
        stamp = self.partial / INPUTS
        if self.inputs is None or (stamp.is_file() and stamp.read_text() == self.inputs):
            for path in sorted(self.partial.glob("*.json")):
                record = json.loads(path.read_text())
                records[record["name"]] = record
        return records

    def begin(self, keep: Iterable[dict]) -> None:
        """Before shards are written: the set stops looking complete, keeping the records in `keep`.

        The manifest goes before any shard is replaced, so it never describes shards that are not there.
        """
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

    def forget(self, keep: Container[str]) -> None:
        """Remove the records not named in `keep` (shards stay until replaced); only while no other process writes."""
        for path in self.partial.glob("*.json"):
            if path.stem not in keep:
                path.unlink()

    def clear_stale(self, keep: Container[str]) -> None:
        """Remove this writer's shards, temporary files and records not named in `keep`; only while no other
        process writes."""
        for path in self.directory.iterdir():
            if _written_here(path) and path.name not in keep and path.is_file():
                path.unlink()
        self.forget(keep)

    def finish(self, manifest: dict) -> None:
        """Write the manifest, which lists every shard of the set, and remove what it does not list."""
        self.clear_stale({s["name"] for s in manifest["shards"]})
        write_json_atomic(self.directory / MANIFEST, manifest)
        shutil.rmtree(self.partial, ignore_errors=True)


def _written_here(path: Path) -> bool:
    """A shard's name, or the temporary name (`files.temp_name`) of a shard or of the manifest."""
    if SHARD_NAME.fullmatch(path.name):
        return True
    target = path.name[1:].removesuffix(".tmp")
    return (target == MANIFEST or bool(SHARD_NAME.fullmatch(target))) and temp_name(path.with_name(target)) == path


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory}: no {MANIFEST}; it is written last, so the shard set is missing or incomplete "
                         f"(run `litegpt prepare` to build or finish it)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
