"""Checking a shard set's files against the sha256 (and size) its manifest records, before they are read.

A damaged file is refused with one line that names it and says how to repair it, instead of a tar or
DataLoader traceback midway through a run (or, worse, training on zeroed bytes).

Fast path: `.verified.json` beside the manifest remembers, per file, the sha256 it matched and the file's
size, mtime_ns, ctime_ns and inode at that moment. A file whose four values are unchanged, checked against
the same sha256, is trusted without being read. That trusts the file system: any write, truncation,
replacement, `touch` or restored mtime changes one of them (ctime cannot be set back by a user), but
corruption the file system does not see (bit rot below it) or a clock set back is not caught until the
file changes or `.verified.json` is deleted (which forces a full check). Writing `.verified.json` is best
effort: on a read-only file system every open hashes every file again.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from litegpt.data.shards import ShardError, read_manifest
from litegpt.files import sha256_file

VERIFIED = ".verified.json"
_FORMAT = "litegpt-verified/1"


class DamagedShardError(ShardError):
    """Shard files that are missing or differ from what their manifest records."""


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_verified(directory: Path) -> dict[str, dict]:
    try:
        data = json.loads((directory / VERIFIED).read_text())
        return data["files"] if data.get("format") == _FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # absent or unreadable: nothing is trusted, everything is hashed


def _write_verified(directory: Path, files: dict[str, dict]) -> None:
    """Best effort, under a unique temporary name: ranks opening the same set may write at once."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{VERIFIED}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"format": _FORMAT, "files": files}, fh, indent=1)
        os.replace(tmp, directory / VERIFIED)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def damaged(directory: Path, records: Iterable[Mapping]) -> dict[str, str]:
    """{file name: what is wrong} for the records' files (each {"name", "sha256"[, "size"]}) in `directory`."""
    directory = Path(directory)
    known = _read_verified(directory)
    verified, problems = dict(known), {}
    for record in records:
        name, path = record["name"], directory / record["name"]
        if not path.is_file():
            problems[name] = "missing"
            continue
        stat = _stat(path)
        if "size" in record and stat[0] != record["size"]:
            problems[name] = f"{stat[0]} bytes, the manifest records {record['size']}"
        elif known.get(name) == {"sha256": record["sha256"], "stat": stat}:
            continue
        elif sha256_file(path) != record["sha256"]:
            problems[name] = "sha256 differs from the manifest's" + ("" if stat[0] else " (empty file)")
        else:
            verified[name] = {"sha256": record["sha256"], "stat": stat}
            continue
        verified.pop(name, None)
    if verified != known:
        _write_verified(directory, verified)
    return problems


def describe(directory: Path, problems: Mapping[str, str]) -> str:
    return f"{directory}: damaged shard(s): " + "; ".join(f"{n} ({why})" for n, why in problems.items())


def verify(directory: Path, records: Iterable[Mapping], repair: str) -> None:
    """Raise DamagedShardError, naming every damaged file and the command that repairs them, if any is."""
    problems = damaged(directory, records)
    if problems:
        raise DamagedShardError(f"{describe(directory, problems)}; repair with: {repair}")


def prepare_command(directory: Path, manifest: Mapping) -> str:
    """The `litegpt prepare` run that wrote this set: run again, it rewrites exactly the shards whose sha256
    no longer matches (prepare's resume) and keeps the others. A vocabulary not read from a --labels file
    (given as lists, or inferred) is spelled out as --local-labels/--global-labels/--no-finding, which
    rebuilds the same one."""
    source, params = manifest.get("source"), manifest.get("params")
    if not source or not params:
        return f"litegpt prepare --root <dataset root> --out {shlex.quote(str(directory))}"
    flags = {"--root": source["root"], "--out": directory}
    if "format" in params:  # recorded only when not vindr
        flags["--format"] = params["format"]
    else:
        flags["--layout"] = params["layout"]
    flags.update({"--max-side": params["max_side"], "--conversion": params["conversion"],
                  "--label-policy": params["label_policy"], "--iou-threshold": params["iou_threshold"],
                  "--box-merge": params["box_merge"], "--samples-per-shard": params["samples_per_shard"]})
    if params["layout"] != "physionet":
        flags["--holdout"] = params["holdout"]
    if "max_pixels" in params:  # recorded only when not the default
        flags["--max-pixels"] = params["max_pixels"]
    if source.get("labels_file"):
        flags["--labels"] = source["labels_file"]
    elif "vocabulary" in params:  # recorded only when not VinDr-CXR's
        vocabulary = params["vocabulary"]
        flags["--local-labels"] = ",".join(vocabulary["local_labels"])
        flags["--global-labels"] = ",".join(vocabulary["global_labels"][:-1])
        flags["--no-finding"] = vocabulary["no_finding"]
    if source.get("template_file"):
        flags["--template"] = source["template_file"]
    return shlex.join(["litegpt", "prepare", *(str(x) for item in flags.items() for x in item)])


def verify_shard_set(directory: Path, split: str | None = None, manifest: dict | None = None) -> dict:
    """Check an image shard set (one split, or all) against its manifest; returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    records = [s for s in manifest["shards"] if split is None or s["split"] == split]
    verify(directory, records, prepare_command(directory, manifest))
    return manifest

