"""Feature cache: fingerprint, build, equivalence with live encoders, refusal, atomicity, subsets."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from litegpt.data.shards import read_manifest
from litegpt.features import (
    FeatureCacheError,
    build_cache,
    cache_dir,
    encode_shards,
    finalize,
    fingerprint,
    fingerprint_inputs,
    open_cache,
)
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR
from litegpt.model.config import Visual
from litegpt.model.inputs import TrainSample

VINDR = Grammar(VINDR_CXR)  # the tiny shards' text: their manifest records no vocabulary


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def cache(tiny_shards, tiny_model, tiny_config):
    build_cache(tiny_shards, tiny_config.vision, backbone=tiny_model.vision, batch_size=2, progress=False)
    return open_cache(tiny_shards, tiny_config.vision)


def test_fingerprint_covers_what_changes_features(tiny_config):
    vision = tiny_config.vision
    base = fingerprint(fingerprint_inputs(vision))
    assert fingerprint(fingerprint_inputs(vision)) == base
    enc = vision.encoders[0]
    variants = [dataclasses.replace(enc, mean=(0.5, 0.5, 0.5)), dataclasses.replace(enc, std=(0.2, 0.2, 0.2)),
                dataclasses.replace(enc, interpolation="bilinear"), dataclasses.replace(enc, layer=1),
                dataclasses.replace(enc, source=tiny_config.vision.encoders[1].source, kind="hf_clip")]
    for variant in variants:
        changed = dataclasses.replace(vision, encoders=(variant, vision.encoders[1]))
        assert fingerprint(fingerprint_inputs(changed)) != base, variant
    assert fingerprint(fingerprint_inputs(dataclasses.replace(vision, feature_dtype="float32"))) != base
    assert fingerprint(fingerprint_inputs(dataclasses.replace(vision, dtype="bfloat16"))) != base
    inputs = fingerprint_inputs(vision)
    assert inputs["encoders"][0]["weights"]["open_clip_pytorch_model.bin"]  # the weights' sha256


def test_weights_change_the_fingerprint(tiny_config, tmp_path):
    import shutil

    enc = tiny_config.vision.encoders[0]
    copy = tmp_path / "biomedclip"
    shutil.copytree(enc.source, copy)
    moved = dataclasses.replace(tiny_config.vision, encoders=(dataclasses.replace(enc, source=str(copy)),
                                                              tiny_config.vision.encoders[1]))
    assert fingerprint(fingerprint_inputs(moved)) == fingerprint(fingerprint_inputs(tiny_config.vision))
    state = torch.load(copy / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.trunk.norm.bias"] += 1
    torch.save(state, copy / "open_clip_pytorch_model.bin")
    assert fingerprint(fingerprint_inputs(moved)) != fingerprint(fingerprint_inputs(tiny_config.vision))


def test_cache_mirrors_the_shards(cache, tiny_shards, tiny_config):
    fp = fingerprint(fingerprint_inputs(tiny_config.vision))
    assert cache.directory == cache_dir(tiny_shards, fp)
    source = read_manifest(tiny_shards)
    assert [s["name"] for s in cache.manifest["shards"]] == [s["name"] for s in source["shards"]]
    assert [s["samples"] for s in cache.manifest["shards"]] == [s["samples"] for s in source["shards"]]
    assert cache.manifest["splits"] == {"train": {"samples": 5, "shards": 2}, "test": {"samples": 2, "shards": 1}}
    assert cache.manifest["fingerprint_inputs"]["encoders"][1]["name"] == "pubmedclip"
    for record in cache.manifest["shards"]:
        images, feats = _members(tiny_shards / record["name"]), _members(cache.directory / record["name"])
        keys = [n.split(".")[0] for n in images if n.endswith(".json")]
        assert sorted(feats) == sorted([f"{k}.json" for k in keys] + [f"{k}.biomedclip.npy" for k in keys]
                                       + [f"{k}.pubmedclip.npy" for k in keys])
        for key in keys:
            assert feats[f"{key}.json"] == images[f"{key}.json"]
            array = np.load(io.BytesIO(feats[f"{key}.biomedclip.npy"]))
            assert array.dtype == np.float16 and array.shape == (196, 64)
    assert not (cache.directory / ".partial").exists()


def test_cached_equals_live_features(cache, tiny_shards, tiny_model):
    images = _members(tiny_shards / "train-000001.tar")
    for key, meta, features in cache.samples("train"):
        if f"{key}.png" not in images:
            continue
        image = Image.open(io.BytesIO(images[f"{key}.png"]))
        pixels = {k: v.unsqueeze(0) for k, v in tiny_model.vision.preprocess(image).items()}
        with torch.no_grad():
            live = tiny_model.vision(pixels)
        for name, tensor in features.items():
            torch.testing.assert_close(tensor, live[name][0], atol=2e-3, rtol=1e-3)


def test_cache_and_live_give_the_same_loss(cache, tiny_shards, tiny_model):
    images = {}
    for record in read_manifest(tiny_shards)["shards"]:
        images.update(_members(tiny_shards / record["name"]))
    live, cached = [], []
    for key, meta, features in cache.samples("train"):
        prompt, answer = VINDR.prompt("identify"), VINDR.answer("identify", meta)
        pixels = tiny_model.vision.preprocess(Image.open(io.BytesIO(images[f"{key}.png"])))
        live.append(TrainSample(key, prompt, answer, pixels, Visual.LIVE))
        cached.append(TrainSample(key, prompt, answer, features, Visual.CACHE))
    with torch.no_grad():
        loss_live = tiny_model(tiny_model.inputs.train_batch(live)).loss
        loss_cached = tiny_model(tiny_model.inputs.train_batch(cached)).loss
    torch.testing.assert_close(loss_cached, loss_live, atol=1e-4, rtol=1e-4)


def test_mismatched_config_is_refused_with_rebuild_command(cache, tiny_shards, tiny_config):
    enc = dataclasses.replace(tiny_config.vision.encoders[0], mean=(0.5, 0.5, 0.5))
    other = dataclasses.replace(tiny_config.vision, encoders=(enc, tiny_config.vision.encoders[1]))
    with pytest.raises(FeatureCacheError, match=r"does not exist\. Caches present for other encoder settings: "
                                                rf"{cache.directory.name}.*litegpt cache-features --shards"):
        open_cache(tiny_shards, other, "configs/model_tiny.yaml")


def test_changed_image_shards_are_refused(tiny_config, tiny_model, make_shards, tmp_path):
    shards = make_shards(tmp_path / "s", {"train": [2]}, seed=1)
    build_cache(shards, tiny_config.vision, backbone=tiny_model.vision, progress=False)
    make_shards(shards, {"train": [2]}, seed=2)  # same names, other images
    with pytest.raises(FeatureCacheError, match="changed since this cache was built"):
        open_cache(shards, tiny_config.vision)
    build_cache(shards, tiny_config.vision, backbone=tiny_model.vision, progress=False)  # re-encodes the shard
    cache = open_cache(shards, tiny_config.vision)
    image = _members(shards / "train-000000.tar")
    key, meta, features = next(cache.samples("train"))
    assert json.loads(image[f"{key}.json"]) == meta


def test_interrupted_build_leaves_nothing_complete(tiny_config, tiny_model, make_shards, tmp_path):
    shards = make_shards(tmp_path / "s", {"train": [3, 3]})
    calls = {"n": 0}

    class Dying(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.preprocess = inner, inner.preprocess

        def forward(self, pixels):
            calls["n"] += 1
            if calls["n"] == 3:  # second batch of the second shard
                raise KeyboardInterrupt
            return self.inner(pixels)

    with pytest.raises(KeyboardInterrupt):
        build_cache(shards, tiny_config.vision, backbone=Dying(tiny_model.vision), batch_size=2, progress=False)
    out = cache_dir(shards, fingerprint(fingerprint_inputs(tiny_config.vision)))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]  # the finished one only
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    with pytest.raises(FeatureCacheError, match="is incomplete"):
        open_cache(shards, tiny_config.vision)
    calls["n"] = -100
    build_cache(shards, tiny_config.vision, backbone=Dying(tiny_model.vision), batch_size=2, progress=False)
    assert calls["n"] == -100 + 2  # resumed: only the unfinished shard was encoded
    assert open_cache(shards, tiny_config.vision).manifest["splits"]["train"]["samples"] == 6
    build_cache(shards, tiny_config.vision, backbone=Dying(tiny_model.vision), batch_size=2, progress=False)
    assert calls["n"] == -100 + 2  # complete: nothing encoded again


def test_subsets_then_finalize(tiny_config, tiny_model, make_shards, tmp_path):
    shards = make_shards(tmp_path / "s", {"train": [1, 1], "test": [1]})
    encode_shards(shards, tiny_config.vision, ["train-000001.tar"], backbone=tiny_model.vision, progress=False)
    with pytest.raises(FeatureCacheError, match="train-000000.tar, test-000000.tar"):
        finalize(shards, tiny_config.vision)
    encode_shards(shards, tiny_config.vision, ["train-000000.tar", "test-000000.tar"], backbone=tiny_model.vision,
                  progress=False)
    out = finalize(shards, tiny_config.vision)
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["samples"] == 1
    with pytest.raises(FeatureCacheError, match="not in its manifest"):
        encode_shards(shards, tiny_config.vision, ["train-000009.tar"], backbone=tiny_model.vision)


def test_cli_and_a_training_step_on_real_shards(prepared, tiny_config, tmp_path):
    """Done criterion: shards from `litegpt prepare` -> `litegpt cache-features` -> one training step."""
    import yaml

    from litegpt.cli import main
    from litegpt.model.model import build_model

    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_config.to_dict()))))
    assert main(["cache-features", "--shards", str(prepared), "--model", str(config), "--batch-size", "16",
                 "--workers", "1"]) == 0
    cache = open_cache(prepared, tiny_config.vision, config)
    model = build_model(tiny_config, with_encoders=False)
    samples = []
    for key, meta, features in cache.samples("train"):
        if meta["findings"]:
            samples.append(TrainSample(key, VINDR.prompt("identify"),
                                       VINDR.answer("identify", meta), features, Visual.CACHE))
        if len(samples) == 4:
            break
    assert len(samples) == 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(model.inputs.train_batch(samples)).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
