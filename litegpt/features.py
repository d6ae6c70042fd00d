"""The frozen-encoder feature cache (DESIGN.md "Feature cache") and `litegpt cache-features`.

Layout: `<shards>/features/<fingerprint>/<split>-%06d.tar` mirrors the image shards one to one. Each
sample is self-contained: `<key>.json` (the image shard's json, byte for byte) and one `<key>.<encoder>.npy`
per encoder, an array [tokens, width] in `vision.feature_dtype` (fp16) written with `numpy.save` (what
webdataset's `npy` encoding does), i.e. patch tokens with the CLS dropped, before fusion. The cache does
not depend on merge, projector or LLM settings, so one cache serves every such ablation.

The fingerprint is a sha256 over everything that changes the features, spelled out in the manifest's
`fingerprint_inputs`: per encoder its name, kind, weight-file hashes (or arch + seed for random weights),
image size, interpolation, mean/std, layer, dropped prefix tokens; the encoders' compute dtype and the
feature dtype; the cache format. Completeness is the shard set's (`shards.ShardSetWriter`): each shard's
record (sample count, sha256, the source shard's sha256) goes to `.partial/`, and `manifest.json` is
written last by `finalize`, which checks that every image shard has its feature shard. Without a
manifest a cache is incomplete and is refused. `encode_shards` takes any subset of shard names, so ranks
can share the work; one process calls `finalize` afterwards. Re-running skips shards already encoded
from the same image shard (resume) and re-encodes those whose image shard changed or whose own file no
longer matches its record (a truncated or altered feature shard: `cache-features` repairs exactly those).

`open_cache` checks the image shards and the feature shards against their manifests' sha256
(`litegpt.data.integrity`, with its stat fast path) and names the damaged ones with the command that
repairs them; decoding refuses non-finite features, and encoding never writes them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from litegpt import __version__
from litegpt.data import integrity
from litegpt.data.shards import MANIFEST, Sample, ShardError, ShardSetWriter, iter_tar, read_manifest, write_shard
from litegpt.model.config import ConfigError, VisionConfig, Visual, load_model_config
from litegpt.model.encoders import VisualBackbone, loader_of, weights_digest

FORMAT = "litegpt-features/1"


class FeatureCacheError(ValueError):
    """A feature cache that is missing, incomplete, stale or built for other encoders."""


def fingerprint_inputs(vision: VisionConfig) -> dict:
    encoders = []
    for e in vision.encoders:
        loader_of(e)  # an unknown kind is refused before anything is hashed
        encoders.append({"name": e.name, "kind": e.kind, "weights": weights_digest(e), "image_size": e.image_size,
                         "interpolation": e.interpolation, "mean": list(e.mean), "std": list(e.std),
                         "layer": e.layer, "drop_prefix_tokens": e.drop_prefix_tokens})
    return {"format": FORMAT, "encoders": encoders, "dtype": vision.dtype, "feature_dtype": vision.feature_dtype}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(shards: Path, fp: str) -> Path:
    return Path(shards) / "features" / fp


def rebuild_hint(shards: Path, model_config: str | Path | None) -> str:
    return f"litegpt cache-features --shards {shards} --model {model_config or '<model config>'}"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_features(members: dict[str, bytes | np.ndarray]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A feature sample's (json, {encoder: tensor [tokens, width]}) from raw tar members or decoded ones.

    Non-finite features are refused: one NaN would reach the batch-norm statistics and the export. The
    error names the shard (`__url__`, when the reader gives it) and the sample (`__key__`).
    """
    meta = members["json"]
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    features = {}
    for ext, value in members.items():
        if ext.endswith(".npy"):
            array = np.load(io.BytesIO(value), allow_pickle=False) if isinstance(value, bytes) else value
            if not np.isfinite(array).all():
                where = f"{members.get('__url__', 'feature shard')}: sample {members.get('__key__', meta.get('image_id'))}"
                raise FeatureCacheError(f"{where}: non-finite values in its {ext} features; remove that shard and re-run "
                                        "`litegpt cache-features`, which re-encodes it")
            features[ext[: -len(".npy")]] = torch.from_numpy(np.ascontiguousarray(array))
    return meta, features


Decode = Callable[[dict], dict[str, torch.Tensor]]  # a shard sample's raw members -> visual input per encoder


def visual_decoder(source: Visual, preprocess: Callable[[Image.Image], dict[str, torch.Tensor]] | None) -> Decode:
    """The visual input of a raw shard sample: its cached features, or its PNG through the encoders' preprocessing."""
    if source is Visual.CACHE:
        return lambda sample: decode_features(sample)[1]
    if preprocess is None:
        raise ValueError("live encoders need their preprocessing (a model built with encoders)")

    def decode(sample: dict) -> dict[str, torch.Tensor]:
        with Image.open(io.BytesIO(sample["png"])) as image:
            return preprocess(image)

    return decode


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode_png(backbone: VisualBackbone, data: bytes) -> dict[str, torch.Tensor]:
    with Image.open(io.BytesIO(data)) as image:
        return backbone.preprocess(image)


def _encoded(path: Path, backbone: VisualBackbone, pool: ThreadPoolExecutor, batch_size: int, device: str,
             bar: tqdm) -> Iterator[Sample]:
    """The feature samples of one image shard: its json byte for byte, and one `<encoder>.npy` per encoder."""
    for batch in _batches(iter_tar(path), batch_size):
        pixels = list(pool.map(lambda sample: _decode_png(backbone, sample.members["png"]), batch))
        stacked = {enc: torch.stack([p[enc] for p in pixels]).to(device) for enc in pixels[0]}
        with torch.inference_mode():
            feats = {enc: f.cpu().numpy() for enc, f in backbone(stacked).items()}
        for enc, f in feats.items():
            bad = [batch[i].key for i in np.flatnonzero(~np.isfinite(f.reshape(len(f), -1)).all(axis=1))]
            if bad:
                raise FeatureCacheError(f"{path}: encoder {enc} gives non-finite features for sample(s) "
                                        f"{', '.join(bad[:5])}; nothing is cached for this shard")
        for i, sample in enumerate(batch):
            yield Sample(sample.key, {"json": sample.members["json"],
                                      **{f"{enc}.npy": _npy(f[i]) for enc, f in feats.items()}})
        bar.update(len(batch))


def encode_shards(shards: Path, vision: VisionConfig, names: Iterable[str], *, backbone: VisualBackbone | None = None,
                  batch_size: int = 32, device: str = "cpu", workers: int = 2, progress: bool = True) -> list[dict]:
    """Encode the named image shards into the cache (skipping ones already done); returns their records."""
    shards = Path(shards)
    image_manifest = read_manifest(shards)
    sources = {s["name"]: s for s in image_manifest["shards"]}
    names = list(names)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise FeatureCacheError(f"{shards}: not in its manifest: {', '.join(unknown)}")
    out = cache_dir(shards, fingerprint(fingerprint_inputs(vision)))
    writer = ShardSetWriter(out)
    done = writer.records()
    current = [done[n] for n in names if n in done and done[n]["source_sha256"] == sources[n]["sha256"]]
    broken = integrity.damaged(out, [r for r in current if (out / r["name"]).is_file()])
    if broken:
        print(f"{integrity.describe(out, broken)}; re-encoding them", file=sys.stderr, flush=True)
    fresh = {r["name"] for r in current if (out / r["name"]).is_file() and r["name"] not in broken}
    records = [done[n] for n in names if n in fresh]
    todo = [n for n in names if n not in fresh]
    if not todo:
        return records
    integrity.verify(shards, [sources[n] for n in todo], integrity.prepare_command(shards, image_manifest))
    writer.begin(done.values())
    if backbone is None:
        backbone = VisualBackbone(vision)
    backbone.to(device)
    bar = tqdm(total=sum(sources[n]["samples"] for n in todo), unit="img", desc="cache-features",
               dynamic_ncols=True, disable=None if progress else True)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for name in todo:
            samples = _encoded(shards / name, backbone, pool, batch_size, device, bar)
            count, digest = write_shard(out / name, samples)
            record = {"name": name, "split": sources[name]["split"], "samples": count, "sha256": digest,
                      "size": (out / name).stat().st_size, "source_sha256": sources[name]["sha256"]}
            if count != sources[name]["samples"]:
                raise FeatureCacheError(f"{shards / name}: {count} samples read, its manifest says "
                                        f"{sources[name]['samples']}")
            writer.add(record)
            records.append(record)
    bar.close()
    return records


def finalize(shards: Path, vision: VisionConfig) -> Path:
    """Write the cache manifest once every image shard has its feature shard; returns the cache directory."""
    shards = Path(shards)
    image_manifest = read_manifest(shards)
    inputs = fingerprint_inputs(vision)
    fp = fingerprint(inputs)
    out = cache_dir(shards, fp)
    writer = ShardSetWriter(out)
    records, missing, done = [], [], writer.records()
    for source in image_manifest["shards"]:
        record = done.get(source["name"])
        if record is None or record["source_sha256"] != source["sha256"] or not (out / source["name"]).is_file():
            missing.append(source["name"])
        else:
            records.append(record)
    if missing:
        raise FeatureCacheError(f"{out}: feature shards not (or not freshly) built: {', '.join(missing)}")
    splits: dict[str, dict] = {}
    for record in records:
        splits.setdefault(record["split"], {"samples": 0, "shards": 0})
        splits[record["split"]]["samples"] += record["samples"]
        splits[record["split"]]["shards"] += 1
    manifest = {"format": FORMAT, "litegpt_version": __version__, "fingerprint": fp,
                "fingerprint_inputs": inputs, "source_shards": str(shards), "splits": splits, "shards": records}
    writer.finish(manifest)  # also removes feature shards of image shards that no longer exist
    return out


def build_cache(shards: Path, vision: VisionConfig, **kwargs) -> Path:
    """Encode every image shard not yet cached, then finalize."""
    names = [s["name"] for s in read_manifest(Path(shards))["shards"]]
    encode_shards(shards, vision, names, **kwargs)
    return finalize(shards, vision)


@dataclass(frozen=True)
class FeatureCache:
    directory: Path
    manifest: dict

    def shard_paths(self, split: str) -> list[Path]:
        return [self.directory / s["name"] for s in self.manifest["shards"] if s["split"] == split]

    def samples(self, split: str) -> Iterator[tuple[str, dict, dict[str, torch.Tensor]]]:
        """(key, json, features) for every sample of a split, in shard order."""
        for path in self.shard_paths(split):
            for sample in iter_tar(path):
                meta, features = decode_features({"__url__": str(path), "__key__": sample.key, **sample.members})
                yield sample.key, meta, features


def open_cache(shards: Path, vision: VisionConfig, model_config: str | Path | None = None) -> FeatureCache:
    """The cache for these encoders, refused (with how to rebuild it) if missing, incomplete or stale."""
    shards = Path(shards)
    inputs = fingerprint_inputs(vision)
    fp = fingerprint(inputs)
    out = cache_dir(shards, fp)
    hint = rebuild_hint(shards, model_config)
    if not (out / MANIFEST).is_file():
        others = sorted(p.name for p in (shards / "features").glob("*/") if (p / MANIFEST).is_file()) \
            if (shards / "features").is_dir() else []
        state = "is incomplete (no manifest.json; an interrupted build?)" if out.is_dir() else "does not exist"
        other = (f" Caches present for other encoder settings: {', '.join(others)} (their manifests' "
                 "fingerprint_inputs say what differs).") if others else ""
        raise FeatureCacheError(f"the feature cache for this model config ({out}) {state}.{other} "
                                f"Build it with: {hint}")
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("fingerprint") != fp or manifest.get("fingerprint_inputs") != json.loads(json.dumps(inputs)):
        raise FeatureCacheError(f"{out}: its manifest does not match this model config's encoders; rebuild with: {hint}")
    image_manifest = integrity.verify_shard_set(shards)  # the stream reads their json (findings filter)
    current = {s["name"]: s["sha256"] for s in image_manifest["shards"]}
    cached = {s["name"]: s["source_sha256"] for s in manifest["shards"]}
    if current != cached:
        raise FeatureCacheError(f"{out}: the image shards in {shards} changed since this cache was built; "
                                f"rebuild it (changed shards are re-encoded) with: {hint}")
    broken = integrity.damaged(out, manifest["shards"])
    if broken:
        raise FeatureCacheError(f"{integrity.describe(out, broken)}; repair with (re-encodes exactly those): {hint}")
    return FeatureCache(out, manifest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, required=True, help="image shard directory, e.g. shards/vindr")
    parser.add_argument("--model", type=Path, required=True, help="model config naming the encoders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding and resizing PNGs")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_model_config(args.model)
        out = build_cache(args.shards, cfg.vision, batch_size=args.batch_size, device=args.device,
                          workers=args.workers)
    except (ShardError, FeatureCacheError, ConfigError) as exc:
        print(f"litegpt cache-features: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST).read_text())
    counts = ", ".join(f"{split} {s['samples']}" for split, s in manifest["splits"].items())
    print(f"feature cache {out} ({counts} samples)")
    return 0
