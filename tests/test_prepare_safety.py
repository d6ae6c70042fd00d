"""`litegpt prepare` and the shard format against what users have: their files in --out, a complete set
re-run with other flags, image ids that are odd but valid file names, and a broken output location."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds

from litegpt.cli import main as cli
from litegpt.data import prepare as prepare_module
from litegpt.data.policy import PolicyConfig
from litegpt.data.prepare import PrepareConfig, prepare
from litegpt.data.shards import (
    MANIFEST,
    Sample,
    ShardError,
    iter_tar,
    read_manifest,
    sample_key,
    shard_paths,
    write_shard,
)


def files(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file directly in `directory`: (bytes, mtime_ns), to show that nothing was touched."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()}


def tars(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*-*.tar"))}


def args(root: Path, out: Path, *extra: str) -> list[str]:
    """The command that built the `prepared` fixture (samples_per_shard 8, one worker), plus `extra`."""
    return ["prepare", "--root", str(root), "--out", str(out), "--samples-per-shard", "8", "--workers", "1", *extra]


@pytest.fixture()
def complete(prepared, tmp_path) -> Path:
    """A copy of a complete shard set, to be re-run over."""
    out = tmp_path / "set"
    shutil.copytree(prepared, out)
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ---- item 2: prepare --out destroys data ------------------------------------------------------------

def test_other_flags_over_a_complete_set_are_refused_and_touch_nothing(complete, synth_root, capsys):
    before = files(complete)
    assert cli(args(synth_root, complete, "--label-policy", "union")) == 2
    err = one_line(capsys)
    assert str(complete) in err and "label_policy drop -> union" in err and "--overwrite" in err
    assert files(complete) == before
    # the same command again: complete and verified, nothing is rewritten
    assert cli(args(synth_root, complete)) == 0
    assert files(complete) == before


def test_only_its_own_files_are_deleted(complete, synth_root):
    theirs = {"backup.tar": b"a user's backup", "train-1.tar": b"not a shard name", "notes.json": b"{}",
              ".backup.tar.tmp": b"someone else's temp file"}
    for name, data in theirs.items():
        (complete / name).write_bytes(data)
    (complete / "train-000099.tar").write_bytes(b"a shard name the new set does not have")
    (complete / ".train-000099.tar.tmp").write_bytes(b"a killed run's temp file")

    assert cli(args(synth_root, complete, "--samples-per-shard", "100", "--overwrite")) == 0
    assert {n: (complete / n).read_bytes() for n in theirs} == theirs
    assert sorted(p.name for p in complete.glob("*-0*.tar")) == ["test-000000.tar", "train-000000.tar"]
    assert not (complete / ".train-000099.tar.tmp").exists() and not (complete / ".partial").exists()


def test_interrupted_overwrite_never_leaves_a_manifest_of_missing_shards(complete, prepared, synth_root, tmp_path,
                                                                         monkeypatch, capsys):
    real = prepare_module.convert_image
    calls = {"n": 0}

    def dies_on_the_12th(job, cfg):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # Ctrl-C while the second shard is converted
        return real(job, cfg)

    cfg = PrepareConfig(root=synth_root, out=complete, samples_per_shard=8, workers=1,
                        policy=PolicyConfig("union"), overwrite=True)
    monkeypatch.setattr(prepare_module, "convert_image", dies_on_the_12th)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not (complete / MANIFEST).exists()  # the broken set does not look complete ...
    with pytest.raises(ShardError, match="no manifest.json"):
        shard_paths(complete, "train")  # ... to training (stream, features and evaluate go through here)
    capsys.readouterr()
    assert cli(["inspect", str(complete)]) == 1  # ... nor to inspect
    assert "no manifest.json" in one_line(capsys)
    # old shards are only ever replaced by new ones: those not yet rewritten are still there, unchanged
    assert tars(complete)["test-000000.tar"] == tars(prepared)["test-000000.tar"]

    monkeypatch.setattr(prepare_module, "convert_image", real)
    prepare(replace(cfg, overwrite=False))  # no complete set any more: the same flags resume it
    fresh = prepare(replace(cfg, out=tmp_path / "fresh"))
    assert tars(complete) == tars(tmp_path / "fresh")
    assert read_manifest(complete) == fresh


# ---- item 4: image ids that are valid file names -------------------------------------------------

ODD_IDS = [
    "1.2.840.113619.2.55.3.604688119.868.1249534557.426",  # a DICOM UID as the file name
    "1", "1.2",  # one is the other's first dot-separated part
    "1.3.6.1.4.1.14519.5.2.1.6279.6001." + "1234567890" * 9,  # 124 characters (USTAR stops at 100)
    "with space", "ünïcødé-画像", "50%off", "a_b-c",
]


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    """A synthetic root whose first images carry ODD_IDS (files and both CSVs renamed)."""
    from litegpt.data.synth import synthesize

    root = synthesize(tmp_path_factory.mktemp("odd") / "root", 10, 3, seed=5, max_side_px=200, progress=False)
    old = sorted(p.stem for p in (root / "train").glob("*.dicom"))[:len(ODD_IDS)]
    for csv in (root / "annotations").glob("*_train.csv"):
        text = csv.read_text()
        for before, after in zip(old, ODD_IDS):
            text = text.replace(before, after)
        csv.write_text(text)
    for before, after in zip(old, ODD_IDS):
        (root / "train" / f"{before}.dicom").rename(root / "train" / f"{after}.dicom")
    return root


@pytest.fixture(scope="module")
def odd_shards(odd_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("odd-shards") / "set"
    assert cli(["prepare", "--root", str(odd_root), "--out", str(out), "--label-policy", "union",
                "--samples-per-shard", "4", "--workers", "1"]) == 0
    return out


def test_every_id_round_trips_through_the_shards(odd_root, odd_shards):
    manifest = read_manifest(odd_shards)
    assert manifest["dropped"] == []
    ids = {p.stem for p in (odd_root / "train").glob("*.dicom")}
    assert set(ODD_IDS) <= ids
    keys = []
    for path in shard_paths(odd_shards, "train"):
        for sample in iter_tar(path):
            assert set(sample.members) == {"png", "json"}
            assert json.loads(sample.members["json"])["image_id"] == sample.key
            keys.append(sample.key)
    assert sorted(keys) == sorted(ids)
    # webdataset, which takes the key up to the first dot of the member name, sees whole samples too
    urls = [str(p) for p in shard_paths(odd_shards, "train")]
    seen = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert all({"png", "json"} <= s.keys() for s in seen)
    assert [sample_key(s["__key__"]) for s in seen] == keys


def test_odd_ids_through_inspect_and_the_feature_cache(odd_shards, tiny_config, tmp_path, capsys):
    from litegpt.features import build_cache

    assert cli(["inspect", str(odd_shards), "--draw", "20", "--draw-dir", str(tmp_path)]) == 0
    assert set(ODD_IDS) <= {p.stem for p in tmp_path.glob("*.png")}
    cache = build_cache(odd_shards, tiny_config.vision, progress=False)
    for image, feature in zip(shard_paths(odd_shards, "train"), shard_paths(cache, "train")):
        cached = list(iter_tar(feature))
        assert [s.key for s in cached] == [s.key for s in iter_tar(image, extensions={"json"})]
        assert all(json.loads(s.members["json"])["image_id"] == s.key for s in cached)
        assert all(len([m for m in s.members if m.endswith(".npy")]) == len(tiny_config.vision.encoders)
                   for s in cached)


def test_vindr_hex_ids_keep_their_bytes(tmp_path):
    """The encoding changes nothing for VinDr's ids: the tar is the USTAR tar the format always wrote."""
    samples = [Sample(key, {"png": os.urandom(300), "json": b'{"image_id": "%s"}' % key.encode()})
               for key in ("000434271f63a053c4128a0ba6352c7f", "fffe1e0bbe3b5f4ba58b74b2efdc7f8b")]
    write_shard(tmp_path / "new.tar", samples)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.members.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "litegpt", "litegpt"
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "new.tar").read_bytes() == buffer.getvalue()


# ---- item 9: I/O errors ---------------------------------------------------------------------------

def test_damaged_manifest_is_named_and_kept_until_overwrite(complete, prepared, synth_root, capsys):
    (complete / MANIFEST).write_text('{"format": "litegpt-shards/1", "shards": [')
    before = files(complete)
    assert cli(args(synth_root, complete)) == 2
    err = one_line(capsys)
    assert str(complete / MANIFEST) in err and "not valid JSON" in err and "--overwrite" in err
    assert files(complete) == before
    assert cli(args(synth_root, complete, "--overwrite")) == 0
    assert tars(complete) == tars(prepared) and read_manifest(complete) == read_manifest(prepared)


def test_out_under_a_regular_file_is_refused(synth_root, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    for out in (tmp_path / "file", tmp_path / "file" / "shards"):
        assert cli(args(synth_root, out)) == 2
        err = one_line(capsys)
        assert f"{tmp_path / 'file'} is a file, not a directory" in err
    assert (tmp_path / "file").read_text() == "a regular file"


@pytest.fixture()
def tmpfs(tmp_path):
    """Mount a small tmpfs (needs root); yields a function (size, read_only) -> remount it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "mnt"
    where.mkdir()
    mounted = []

    def mount(options: str) -> Path:
        cmd = ["mount", "-o", f"remount,{options}", str(where)] if mounted else \
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(options)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_full_disk_is_one_line_and_resumes(prepared, synth_root, tmpfs, capsys):
    out = tmpfs("size=3m") / "set"  # the first two train shards fit (2.2 MB), the third does not
    assert cli(args(synth_root, out)) == 1
    err = one_line(capsys)
    assert str(out / "train-000002.tar") in err and "No space left on device" in err
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*-*.tar")}
    assert sorted(written) == ["train-000000.tar", "train-000001.tar"]
    assert not list(out.glob(".*.tmp")) and not (out / MANIFEST).exists()

    tmpfs("size=64m")
    assert cli(args(synth_root, out)) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in written} == written  # resumed, not redone
    assert tars(out) == tars(prepared) and read_manifest(out) == read_manifest(prepared)


def test_read_only_file_system(prepared, synth_root, tmpfs, capsys):
    out = tmpfs("size=64m") / "set"
    shutil.copytree(prepared, out)
    tmpfs("ro")
    assert cli(args(synth_root, out)) == 0  # complete and verified: nothing to write
    capsys.readouterr()
    assert cli(args(synth_root, out, "--label-policy", "union", "--overwrite")) == 1
    err = one_line(capsys)
    assert str(out) in err and "Read-only file system" in err
    assert tars(out) == tars(prepared) and read_manifest(out) == read_manifest(prepared)
