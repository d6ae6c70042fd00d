"""Integrity end to end (issue 14, items 1 and 7), on real files: shard tars from `litegpt synth` + `prepare`,
a real feature cache, real exports of the tiny model, each damaged the way a disk or a user damages them
(truncated, zeroed, a byte flipped, a NaN patched in)."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from litegpt.cli import main
from litegpt.data import integrity
from litegpt.data.integrity import VERIFIED, DamagedShardError, verify_shard_set
from litegpt.data.shards import Sample, iter_tar, read_manifest, write_shard
from litegpt.features import FeatureCacheError, build_cache, decode_features, open_cache
from litegpt.model.export import ExportError, load_export, save_export
from litegpt.model.model import build_model


def _stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.tar"))}


def _only_line(err: str) -> str:
    """The command's one error line (logging's own complaints about capsys's closed streams aside)."""
    lines = [line for line in err.splitlines() if line.startswith("litegpt ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def shards(prepared, tmp_path) -> Path:
    """A private copy of the session's prepared shards (without any feature cache)."""
    out = tmp_path / "synth"
    shutil.copytree(prepared, out, ignore=shutil.ignore_patterns("features", VERIFIED))
    return out


# ---- image shards ---------------------------------------------------------------------------------

def test_truncated_image_shard_is_named_and_prepare_repairs_exactly_it(shards, capsys):
    damaged = shards / "train-000001.tar"
    os.truncate(damaged, damaged.stat().st_size // 2)
    before = _stats(shards)
    assert main(["inspect", str(shards)]) == 1
    line = _only_line(capsys.readouterr().err)
    assert f"{shards}: damaged shard(s): train-000001.tar (sha256 differs" in line
    command = line.split("repair with: ")[1]
    assert command.startswith(f"litegpt prepare --root {read_manifest(shards)['source']['root']} --out {shards} ")
    assert main([*shlex.split(command)[1:], "--workers", "1"]) == 0
    after = _stats(shards)
    assert {n for n in after if after[n] != before[n]} == {"train-000001.tar"}  # only the damaged one rewritten
    verify_shard_set(shards)
    assert main(["inspect", str(shards)]) == 0


def test_zeroed_shard_is_caught_even_with_its_size_and_mtime_restored(shards):
    verify_shard_set(shards)  # records the fast path
    assert set(json.loads((shards / VERIFIED).read_text())["files"]) == {s["name"] for s in
                                                                          read_manifest(shards)["shards"]}
    path = shards / "test-000000.tar"
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.write(bytes(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as verified; ctime moved on
    with pytest.raises(DamagedShardError, match=r"test-000000\.tar \(sha256 differs.*repair with: litegpt prepare"):
        verify_shard_set(shards, "test")


def test_unchanged_files_are_trusted_without_reading_them(shards, monkeypatch):
    verify_shard_set(shards)
    read = []
    monkeypatch.setattr(integrity, "sha256_file", lambda path: read.append(path) or "")
    verify_shard_set(shards)  # every file as verified: nothing is hashed
    assert read == []
    (shards / "train-000000.tar").touch()
    with pytest.raises(DamagedShardError, match=r"train-000000\.tar"):  # touched: hashed again (here: "")
        verify_shard_set(shards)
    assert read == [shards / "train-000000.tar"]


def test_evaluate_names_a_truncated_image_shard(shards, export_dir, capsys):
    os.truncate(shards / "test-000000.tar", 1000)
    assert main(["evaluate", "--run", str(export_dir.parent), "--shards", str(shards), "--features", "live"]) == 1
    line = _only_line(capsys.readouterr().err)
    assert "test-000000.tar (sha256 differs" in line and "litegpt prepare" in line


# ---- feature cache ----------------------------------------------------------------------------------

@pytest.fixture
def cached(shards, tiny_config, tiny_model, tmp_path):
    """(shards, cache directory, model config path) with the cache built for the tiny encoders."""
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_config.to_dict()))))
    cache = build_cache(shards, tiny_config.vision, backbone=tiny_model.vision, batch_size=16, workers=1,
                        progress=False)
    return shards, cache, config


def test_truncated_cache_shard_is_refused_and_cache_features_repairs_exactly_it(cached, tiny_config, capsys):
    shards, cache, config = cached
    os.truncate(cache / "train-000002.tar", (cache / "train-000002.tar").stat().st_size - 700)
    before = _stats(cache)
    with pytest.raises(FeatureCacheError, match=r"train-000002\.tar \(\d+ bytes, the manifest records \d+\).*"
                                                r"litegpt cache-features --shards"):
        open_cache(shards, tiny_config.vision, config)
    assert main(["cache-features", "--shards", str(shards), "--model", str(config), "--workers", "1"]) == 0
    assert "train-000002.tar" in capsys.readouterr().err  # says what it re-encodes
    after = _stats(cache)
    assert {n for n in after if after[n] != before[n]} == {"train-000002.tar"}
    assert sum(1 for _ in open_cache(shards, tiny_config.vision, config).samples("train")) == \
        read_manifest(shards)["splits"]["train"]["samples"]


def _patch_nan(path: Path) -> None:
    """Rewrite a feature shard with one value of its first sample's first encoder set to NaN."""
    samples = list(iter_tar(path))
    ext = next(e for e in samples[0].members if e.endswith(".npy"))
    array = np.load(io.BytesIO(samples[0].members[ext]))
    array[0, 0] = np.nan
    buffer = io.BytesIO()
    np.save(buffer, array)
    samples[0] = Sample(samples[0].key, {**samples[0].members, ext: buffer.getvalue()})
    write_shard(path, samples)


def test_a_nan_patched_into_the_cache_is_refused(cached, tiny_config):
    shards, cache, config = cached
    _patch_nan(cache / "test-000000.tar")
    with pytest.raises(FeatureCacheError, match=r"test-000000\.tar \(sha256 differs"):
        open_cache(shards, tiny_config.vision, config)


def test_non_finite_features_are_refused_when_decoded_naming_shard_and_key(cached, tiny_config):
    """A cache whose hashes match but whose features hold a NaN (an encoder gave one, before encoding checked)."""
    shards, cache, config = cached
    _patch_nan(cache / "test-000000.tar")
    manifest = json.loads((cache / "manifest.json").read_text())
    for record in manifest["shards"]:
        if record["name"] == "test-000000.tar":
            record["sha256"] = integrity.sha256_file(cache / record["name"])
            record["size"] = (cache / record["name"]).stat().st_size
    (cache / "manifest.json").write_text(json.dumps(manifest))
    key = next(iter_tar(cache / "test-000000.tar")).key
    with pytest.raises(FeatureCacheError, match=rf"test-000000\.tar: sample {key}: non-finite values"):
        list(open_cache(shards, tiny_config.vision, config).samples("test"))


def test_decode_refuses_inf():
    buffer = io.BytesIO()
    np.save(buffer, np.array([[1.0, np.inf]], dtype=np.float16))
    with pytest.raises(FeatureCacheError, match="s.tar: sample k: non-finite values in its enc.npy"):
        decode_features({"__url__": "s.tar", "__key__": "k", "json": b"{}", "enc.npy": buffer.getvalue()})


# ---- exports ----------------------------------------------------------------------------------------

@pytest.fixture
def export_dir(tiny_model, tmp_path) -> Path:
    out = tmp_path / "run" / "stage1" / "export"
    save_export(tiny_model, out, {"stage": "stage1", "step": 1, "tasks": ["identify", "vqa"]})
    return out


def test_export_records_the_sha256_of_its_files(export_dir, tiny_config):
    files = json.loads((export_dir / "export.json").read_text())["files"]
    assert {"projector.safetensors", "model.yaml", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json"} <= set(files)
    assert files["projector.safetensors"] == integrity.sha256_file(export_dir / "projector.safetensors")
    load_export(build_model(tiny_config, with_encoders=False), export_dir)


def test_altered_projector_is_refused_by_name(export_dir, shards, tiny_config, capsys):
    path = export_dir / "projector.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a weight's byte; the header is intact, so safetensors would load it
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"projector\.safetensors \(sha256 differs from export\.json's\)"):
        load_export(build_model(tiny_config, with_encoders=False), export_dir)
    assert main(["evaluate", "--run", str(export_dir.parent), "--shards", str(shards), "--features", "live"]) == 1
    assert "projector.safetensors (sha256 differs" in _only_line(capsys.readouterr().err)


def test_truncated_adapter_is_refused_by_name(export_dir, tiny_config):
    path = export_dir / "adapter" / "adapter_model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ExportError, match=r"adapter/adapter_model\.safetensors \(sha256 differs.*re-export"):
        load_export(build_model(tiny_config, with_encoders=False), export_dir)


def test_exports_without_hashes_load_with_a_warning_and_damage_is_still_named(export_dir, tiny_config, caplog):
    info = json.loads((export_dir / "export.json").read_text())
    del info["files"]
    (export_dir / "export.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        load_export(build_model(tiny_config, with_encoders=False), export_dir)
    assert "records no file hashes" in caplog.text
    os.truncate(export_dir / "projector.safetensors", 100)
    with pytest.raises(ExportError, match=r"projector\.safetensors: unreadable"):
        load_export(build_model(tiny_config, with_encoders=False), export_dir)


def test_non_finite_batch_norm_statistics_are_never_exported(tiny_config, export_dir):
    model = build_model(tiny_config, with_encoders=False)
    norm = next(m for m in model.merge.modules() if isinstance(m, torch.nn.BatchNorm1d))
    norm.running_var[3] = float("nan")
    before = (export_dir / "export.json").read_bytes()
    with pytest.raises(ExportError, match=r"not exported: non-finite values in merge\..*running_var"):
        save_export(model, export_dir, {"stage": "stage1"})
    assert (export_dir / "export.json").read_bytes() == before  # the previous export is kept
