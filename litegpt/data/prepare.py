"""`litegpt prepare`: a dataset root -> verified WebDataset shards.

Formats (`readers.read_dataset`): `vindr`, a VinDr-CXR root (PhysioNet or Kaggle layout) with VinDr-CXR's
labels or its own label list; `csv`, the generic box CSV (`box_csv`); `coco`, COCO detection JSON (`coco`).
The label vocabulary and the task template go into manifest.json, where everything downstream reads them.

Flow: read the annotations (sources) -> combine raters (policy) -> cut the surviving images into shards in
(split, image_id) order -> convert DICOMs and PNG/JPEGs in worker processes -> the main process writes each shard in
order (so the bytes never depend on the worker count) -> manifest.json last. A shard's record is kept in
`.partial/` as soon as it is written, so a re-run with the same inputs and parameters resumes, and one
over a complete, verified set changes nothing. Over a complete set made with other parameters (or from
another root) it is refused unless `--overwrite`; over an incomplete one, or when only the input files
changed, it starts over. Only prepare's own files in `--out` are ever deleted (`shards.ShardSetWriter`),
and a shard only once its replacement is written (or, at the end, when the new set has no such shard).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import yaml
from tqdm import tqdm

from litegpt import __version__
from litegpt.data.dicom import MAX_PIXELS, ConvertConfig, DicomError, convert_dicom, convert_image_file
from litegpt.data.policy import Conflict, Labels, PolicyConfig, apply_policy
from litegpt.data.readers import FORMATS, read_dataset
from litegpt.data.shards import (
    FORMAT,
    INPUTS,
    MANIFEST,
    SPLITS,
    Sample,
    ShardError,
    ShardSetWriter,
    iter_json,
    png_bytes,
    read_manifest,
    shard_name,
    write_shard,
)
from litegpt.data.sources import DatasetError, ImageRecord, Problem, detect_layout
from litegpt.files import sha256_file
from litegpt.grammar import PAPER_TEMPLATE, Grammar, TaskTemplate
from litegpt.labels import DEFAULT_NO_FINDING, VINDR_CXR, Vocabulary, VocabularyError

BOX_TOLERANCE_PX = 1.0  # boxes may overrun the image by rounding; more than this is an annotation error


@dataclass(frozen=True)
class PrepareConfig:
    root: Path
    out: Path
    layout: str = "auto"
    holdout: float = 0.1
    convert: ConvertConfig = ConvertConfig()
    policy: PolicyConfig = PolicyConfig()
    samples_per_shard: int = 512
    png_compress_level: int = 1
    workers: int = os.cpu_count() or 1
    max_bad: int | None = None
    overwrite: bool = False  # replace a complete set made with other parameters
    format: str = "vindr"
    vocabulary: Vocabulary | None = None  # None: VinDr-CXR's for vindr, inferred from the data for csv/coco
    no_finding: str | None = None  # the no-finding label of an inferred vocabulary (default DEFAULT_NO_FINDING)
    template: TaskTemplate = PAPER_TEMPLATE
    labels_file: Path | None = None  # where `vocabulary` and `template` came from, for the rebuild hint
    template_file: Path | None = None

    def params(self) -> dict:
        """Everything that changes the shards' bytes or their text (not root/out/workers/max_bad/overwrite).
        Format, vocabulary and template only when not VinDr-CXR's defaults, so VinDr sets keep their params."""
        vocabulary = self.vocabulary or VINDR_CXR
        return {
            "layout": self.layout, "holdout": self.holdout, "max_side": self.convert.max_side,
            "conversion": self.convert.method, "label_policy": self.policy.policy,
            "iou_threshold": self.policy.iou_threshold, "box_merge": self.policy.box_merge,
            "samples_per_shard": self.samples_per_shard, "png_compress_level": self.png_compress_level,
            # only when set: sets prepared before the limit existed stay valid (the default admits every VinDr image)
            **({"max_pixels": self.convert.max_pixels} if self.convert.max_pixels != MAX_PIXELS else {}),
            **({"format": self.format} if self.format != "vindr" else {}),
            **({"vocabulary": vocabulary.to_dict()} if vocabulary != VINDR_CXR else {}),
            **({"template": self.template.to_dict()} if self.template != PAPER_TEMPLATE else {}),
        }


@dataclass(frozen=True)
class ImageJob:
    """One image to convert, with its labels already decided (boxes in original pixels)."""

    image_id: str
    split: str
    path: str
    labels: Labels


@dataclass(frozen=True)
class Result:
    image_id: str
    sample: Sample | None
    problem: Problem | None


# ---------------------------------------------------------------- worker side

def convert_image(job: ImageJob, cfg: PrepareConfig) -> Result:
    """Decode and convert one DICOM (.dcm/.dicom) or PNG/JPEG and normalise its boxes; never raises for a
    bad file. PNG/JPEGs are read as `predict` reads them (`convert_image_file`) and resized alike."""
    path = Path(job.path)
    dicom = path.suffix.lower() in (".dcm", ".dicom")
    kind = "bad_dicom" if dicom else "bad_image"
    try:
        with warnings.catch_warnings():  # pydicom warns about damaged files; the manifest records them instead
            warnings.simplefilter("ignore")
            if dicom:
                image = convert_dicom(path, cfg.convert)
            else:
                image = convert_image_file(path, cfg.convert.max_side, cfg.convert.max_pixels)
    except DicomError as exc:
        return Result(job.image_id, None, Problem(job.image_id, job.split, kind, str(exc)))
    except Exception as exc:  # noqa: BLE001 - one odd file among 18,000 must not end the run
        reason = f"{job.path}: unexpected {type(exc).__name__} while converting: {exc}"
        return Result(job.image_id, None, Problem(job.image_id, job.split, kind, reason))
    findings = []
    for label, (x0, y0, x1, y1) in job.labels.findings:
        if x1 > image.cols + BOX_TOLERANCE_PX or y1 > image.rows + BOX_TOLERANCE_PX:
            reason = (f"{job.path}: {label} box {[x0, y0, x1, y1]} lies outside the image "
                      f"({image.cols} x {image.rows} px)")
            return Result(job.image_id, None, Problem(job.image_id, job.split, "bad_annotation", reason))
        box = [min(x0 / image.cols, 1.0), min(y0 / image.rows, 1.0), min(x1 / image.cols, 1.0), min(y1 / image.rows, 1.0)]
        findings.append({"label": label, "box": box})
    meta = {
        "image_id": job.image_id,
        "split": job.split,
        "source": {"rows": image.rows, "cols": image.cols, "photometric": image.photometric,
                   "bits_stored": image.bits_stored, "transfer_syntax": image.transfer_syntax, "window": image.window},
        "size": [int(image.pixels.shape[1]), int(image.pixels.shape[0])],
        "findings": findings,
        "diagnoses": job.labels.diagnoses,
        "n_raters": job.labels.n_raters,
    }
    members = {"png": png_bytes(image.pixels, cfg.png_compress_level),
               "json": json.dumps(meta, sort_keys=True).encode()}
    return Result(job.image_id, Sample(job.image_id, members), None)


# ---------------------------------------------------------------- main side

def plan(records: list[ImageRecord], cfg: PrepareConfig) -> tuple[list[ImageJob], list[Problem]]:
    """Apply the label policy (labels of `cfg.vocabulary`); returns the images to convert and those the
    policy drops."""
    jobs, dropped = [], []
    for record in records:
        try:
            labels = apply_policy(record, cfg.policy, cfg.vocabulary or VINDR_CXR)
        except Conflict as exc:
            dropped.append(Problem(record.image_id, record.split, "label_policy", f"{record.annotations[0].file}: {exc}"))
            continue
        jobs.append(ImageJob(record.image_id, record.split, str(record.path), labels))
    return jobs, dropped


def chunk(jobs: list[ImageJob], size: int) -> list[tuple[str, list[ImageJob]]]:
    """Cut each split's images into consecutive shards; the assignment depends on the inputs alone."""
    shards = []
    for split in SPLITS:
        in_split = [j for j in jobs if j.split == split]
        for index, start in enumerate(range(0, len(in_split), size)):
            shards.append((shard_name(split, index), in_split[start:start + size]))
    return shards


def inputs_fingerprint(jobs: list[ImageJob], cfg: PrepareConfig) -> str:
    digest = hashlib.sha256(json.dumps(cfg.params(), sort_keys=True).encode())
    for j in jobs:
        stat = os.stat(j.path)
        digest.update(json.dumps([j.image_id, j.split, stat.st_size, stat.st_mtime_ns, asdict(j.labels)]).encode())
    return digest.hexdigest()


def _manifest_records(manifest: dict) -> list[dict]:
    """A finished set's shard records, each with the drops it had (as `.partial/` keeps them)."""
    return [{**shard, "dropped": [d for d in manifest["dropped"] if d.get("shard") == shard["name"]]}
            for shard in manifest["shards"]]


def _results(jobs: list[ImageJob], cfg: PrepareConfig) -> Iterator[Result]:
    """Each job's result, in order; with several workers, converted in worker processes."""
    if cfg.workers <= 1:
        yield from (convert_image(job, cfg) for job in jobs)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # not multiprocessing.Pool: its terminate() can hang while a worker is sending a large result
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        futures = [pool.submit(convert_image, job, cfg) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:  # stopped early (--max-bad, Ctrl-C): conversions not yet started are dropped
            for future in futures:
                future.cancel()


class Refused(ValueError):
    """An --out that prepare may not write into as asked (exit 2): nothing has been changed."""


def existing_set(cfg: PrepareConfig) -> dict | None:
    """The manifest of the complete set in --out, None if there is none; refuses an --out that is not a
    directory, or whose manifest.json is unreadable or not a shard set's (with --overwrite, the latter is
    removed: the set it claims to describe is replaced)."""
    for path in (cfg.out, *cfg.out.parents):
        if path.exists():
            if not path.is_dir():
                raise Refused(f"--out {cfg.out}: {path} is a file, not a directory")
            break
    path = cfg.out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = read_manifest(cfg.out)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or INPUTS not in manifest:
            raise ShardError(f"{path}: not a {FORMAT} shard-set manifest")
    except ShardError as exc:
        if not cfg.overwrite:
            raise Refused(f"{exc}; prepare does not replace a set it cannot read: move the file away, "
                          "or pass --overwrite to rebuild the set") from None
        path.unlink()
        return None
    return manifest


def refuse_replacing(old: dict | None, cfg: PrepareConfig, fingerprint: str) -> None:
    """A complete set made with other parameters or from another root is only replaced with --overwrite."""
    if old is None or cfg.overwrite or old[INPUTS] == fingerprint:
        return
    before, now = old.get("params", {}), cfg.params()
    changed = [f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(before.keys() | now.keys())
               if before.get(k) != now.get(k)]
    root = old.get("source", {}).get("root")
    if root is None or Path(root).resolve() != cfg.root.resolve():
        changed.insert(0, f"root {root} -> {cfg.root}")
    if changed:
        raise Refused(f"{cfg.out} holds a complete shard set made with other parameters ({'; '.join(changed)}); "
                      "pass --overwrite to replace it, or choose another --out")


def prepare(cfg: PrepareConfig) -> dict:
    """Build (or finish) the shard set; returns the manifest."""
    if cfg.format == "vindr" and cfg.layout == "auto":
        cfg = replace(cfg, layout=detect_layout(cfg.root))
    old = existing_set(cfg)
    records, problems, vocabulary = read_dataset(cfg.root, cfg.format, layout=cfg.layout, holdout=cfg.holdout,
                                                 vocabulary=cfg.vocabulary, no_finding=cfg.no_finding)
    if cfg.format != "vindr":  # csv and coco have one layout each, named after the format
        cfg = replace(cfg, layout=cfg.format)
    cfg = replace(cfg, vocabulary=vocabulary)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # decoder tracebacks for files we skip and list anyway
    jobs, policy_drops = plan(records, cfg)
    fingerprint = inputs_fingerprint(jobs, cfg)
    refuse_replacing(old, cfg, fingerprint)
    cfg.out.mkdir(parents=True, exist_ok=True)
    writer = ShardSetWriter(cfg.out, fingerprint, _manifest_records)
    done = {name: r for name, r in writer.records().items()  # verified: a shard may have changed since
            if (cfg.out / name).is_file() and sha256_file(cfg.out / name) == r["sha256"]}
    shards = chunk(jobs, cfg.samples_per_shard)
    if old is not None and old[INPUTS] == fingerprint and done.keys() == {n for n, _ in shards}:
        return old  # complete and verified: nothing is written (a read-only copy works too)
    writer.forget(keep=done)
    writer.begin(done.values())

    bad = [p for p in problems if p.kind not in ("label_policy", "duplicate_row")]  # duplicates lose nothing
    for record in done.values():
        bad.extend(Problem(d["image_id"], d["split"], d["kind"], d["reason"]) for d in record["dropped"])
    todo = [(name, members) for name, members in shards if name not in done]
    done.update(_write_shards(todo, cfg, writer, bad, len(policy_drops)))

    manifest = build_manifest(cfg, fingerprint, [done[n] for n, _ in shards], problems + policy_drops)
    writer.finish(manifest)
    return manifest


class TooManyBad(RuntimeError):
    pass


def _write_shards(todo: list[tuple[str, list[ImageJob]]], cfg: PrepareConfig, writer: ShardSetWriter,
                  bad: list[Problem], policy_dropped: int) -> dict[str, dict]:
    """Convert and write the shards still to do, in order; returns their records. Unusable inputs go to `bad`."""
    written = {}
    results = _results([j for _, members in todo for j in members], cfg)
    with tqdm(total=sum(len(m) for _, m in todo), unit="img", desc="prepare", dynamic_ncols=True,
              disable=None) as bar:
        for name, members in todo:
            drops: list[Problem] = []

            def samples() -> Iterator[Sample]:
                for _ in members:
                    result = next(results)
                    bar.update(1)
                    if result.problem is None:
                        yield result.sample
                        continue
                    drops.append(result.problem)
                    bad.append(result.problem)
                    bar.set_postfix(dropped=len(bad) + policy_dropped, refresh=False)
                    tqdm.write(f"skipped {result.problem.reason}", file=sys.stderr)
                    if cfg.max_bad is not None and len(bad) > cfg.max_bad:
                        raise TooManyBad(f"more than --max-bad {cfg.max_bad} unusable inputs; "
                                         f"last: {result.problem.reason}")

            count, digest = write_shard(cfg.out / name, samples())
            written[name] = {"name": name, "split": name.split("-")[0], "samples": count, "sha256": digest,
                             "dropped": [{**p.as_dict(), "shard": name} for p in drops]}
            writer.add(written[name])
    return written


def build_manifest(cfg: PrepareConfig, fingerprint: str, shards: list[dict], dropped: list[Problem]) -> dict:
    """Counts are recomputed from the written shards' JSON, not from the plan, so they describe the files;
    per-label tables in the vocabulary's order."""
    vocabulary = cfg.vocabulary or VINDR_CXR
    splits: dict[str, dict] = {}
    for split in SPLITS:
        stats = {"samples": 0, "images_with_findings": 0, "images": {}, "boxes": {}}
        for shard in (s for s in shards if s["split"] == split):
            for meta in iter_json(cfg.out / shard["name"]):
                stats["samples"] += 1
                stats["images_with_findings"] += bool(meta["findings"])
                labels = {f["label"] for f in meta["findings"]} | set(meta["diagnoses"])
                for label in labels:
                    stats["images"][label] = stats["images"].get(label, 0) + 1
                for f in meta["findings"]:
                    stats["boxes"][f["label"]] = stats["boxes"].get(f["label"], 0) + 1
        stats["images"] = {k: stats["images"][k] for k in vocabulary.all_labels if k in stats["images"]}
        stats["boxes"] = {k: stats["boxes"][k] for k in vocabulary.all_labels if k in stats["boxes"]}
        splits[split] = stats
    all_dropped = sorted((p.as_dict() for p in dropped), key=lambda d: (d["split"], d["image_id"]))
    all_dropped += [d for s in shards for d in s.get("dropped", [])]
    return {
        "format": FORMAT,
        "litegpt_version": __version__,
        "source": {"root": str(cfg.root), "format": cfg.format, "layout": cfg.layout,
                   "holdout": cfg.holdout if cfg.layout != "physionet" else None,
                   "global_labels": cfg.layout == "physionet" or (cfg.format == "csv" and bool(vocabulary.diseases)),
                   # the files --labels and --template named, only when given (for the rebuild hint)
                   **({"labels_file": str(cfg.labels_file)} if cfg.labels_file is not None else {}),
                   **({"template_file": str(cfg.template_file)} if cfg.template_file is not None else {})},
        "params": cfg.params(),
        "inputs_sha256": fingerprint,
        **Grammar(vocabulary, cfg.template).to_dict(),
        "splits": splits,
        "shards": [{k: s[k] for k in ("name", "split", "samples", "sha256")} for s in shards],
        "dropped": sorted(all_dropped, key=lambda d: (d["split"], d["image_id"])),
    }


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="dataset root (see --format)")
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. shards/vindr")
    parser.add_argument("--format", choices=FORMATS, default="vindr",
                        help="vindr: a VinDr-CXR root (PhysioNet or Kaggle layout, default); csv: <root>/annotations.csv "
                             "(image, label, x_min, y_min, x_max, y_max[, rater][, split]); coco: "
                             "<root>/annotations/instances_{train,test}.json with the images in <root>/images")
    parser.add_argument("--layout", choices=("auto", "physionet", "kaggle"), default="auto",
                        help="vindr format only (default auto: detected)")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="fraction of image ids held out as the test split where the data names none: Kaggle "
                             "layout, csv without a split column, coco with only a train file (default 0.1)")
    labels = parser.add_argument_group("labels (default: VinDr-CXR's for vindr, inferred from the data for csv/coco)")
    labels.add_argument("--labels", type=Path, default=None, metavar="FILE.yaml",
                        help="the label vocabulary: name, local_labels, global_labels, no_finding, aliases")
    labels.add_argument("--local-labels", default=None, metavar="A,B,...",
                        help="the local labels (with boxes), comma-separated, in rendering order (instead of --labels)")
    labels.add_argument("--global-labels", default=None, metavar="C,D,...",
                        help="the global labels (image level, no box), comma-separated; with --local-labels")
    labels.add_argument("--no-finding", default=None, metavar="NAME",
                        help=f"the label of an image with no finding (default {DEFAULT_NO_FINDING!r}; with "
                             "--labels set no_finding in the file)")
    parser.add_argument("--template", type=Path, default=None, metavar="FILE.yaml",
                        help="the task template's sentences (some of: identify, vqa, local_prefix, global_prefix, "
                             "no_findings_prefix, no_findings, no_diagnosis); default the paper's")
    parser.add_argument("--max-side", type=int, default=1024, help="longer image side in the shards (default 1024)")
    parser.add_argument("--conversion", choices=("lut", "paper"), default="lut",
                        help="DICOM only. lut: modality/VOI LUT as a viewer shows it (default); paper: appendix A.1 "
                             "windowing")
    parser.add_argument("--label-policy", choices=("drop", "union", "majority"), default="drop",
                        help="how to combine raters (default drop: remove images where raters conflict, paper 4.2)")
    parser.add_argument("--box-merge", choices=("medoid", "mean"), default="medoid",
                        help="representative of overlapping boxes (default medoid: one of the input boxes)")
    parser.add_argument("--iou-threshold", type=float, default=0.5)
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    parser.add_argument("--max-bad", type=int, default=None,
                        help="fail when more than this many inputs are unusable (default: no limit; all are listed)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"refuse an image whose header claims more pixel values, before decoding it (default "
                             f"{MAX_PIXELS:,} = 8192 x 8192)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete shard set in --out made with other parameters (refused without)")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def vocabulary_of(args: argparse.Namespace) -> Vocabulary | None:
    """The vocabulary the command line gives (None: the format's default); VocabularyError for a bad one.
    One built from --local-labels/--global-labels is named after the root folder."""
    if args.labels is not None:
        if args.local_labels is not None or args.global_labels is not None or args.no_finding is not None:
            raise VocabularyError("--labels gives the whole vocabulary; --local-labels, --global-labels and "
                                  "--no-finding go into that file instead")
        return Vocabulary.from_yaml(args.labels)
    if args.local_labels is None:
        if args.global_labels is not None:
            raise VocabularyError("--global-labels needs --local-labels")
        return None
    return Vocabulary.build(args.root.resolve().name or "dataset", _names(args.local_labels),
                            _names(args.global_labels or ""), args.no_finding or DEFAULT_NO_FINDING)


def template_of(path: Path | None) -> TaskTemplate:
    if path is None:
        return PAPER_TEMPLATE
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise VocabularyError(f"{path}: cannot read the template ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise VocabularyError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return TaskTemplate.from_dict(data, str(path))


def run(args: argparse.Namespace) -> int:
    if args.samples_per_shard < 1 or args.workers < 1 or args.max_side < 8 or args.max_pixels < 1:
        print("litegpt prepare: --samples-per-shard, --workers and --max-pixels must be >= 1, --max-side >= 8",
              file=sys.stderr)
        return 2
    if args.format != "vindr" and args.layout != "auto":
        print(f"litegpt prepare: --layout is for --format vindr, not {args.format}", file=sys.stderr)
        return 2
    if args.format == "vindr" and args.no_finding is not None and args.local_labels is None:
        print("litegpt prepare: --no-finding with --format vindr needs --local-labels (or set it in --labels)",
              file=sys.stderr)
        return 2
    try:
        vocabulary, template = vocabulary_of(args), template_of(args.template)
    except VocabularyError as exc:
        print(f"litegpt prepare: {exc}", file=sys.stderr)
        return 2
    cfg = PrepareConfig(
        root=args.root, out=args.out, layout=args.layout, holdout=args.holdout,
        convert=ConvertConfig(max_side=args.max_side, method=args.conversion, max_pixels=args.max_pixels),
        policy=PolicyConfig(args.label_policy, args.iou_threshold, args.box_merge),
        samples_per_shard=args.samples_per_shard, workers=args.workers, max_bad=args.max_bad,
        overwrite=args.overwrite, format=args.format, vocabulary=vocabulary, no_finding=args.no_finding,
        template=template, labels_file=args.labels, template_file=args.template,
    )
    try:
        manifest = prepare(cfg)
    except Refused as exc:
        print(f"litegpt prepare: {exc}", file=sys.stderr)
        return 2
    except (DatasetError, TooManyBad) as exc:
        print(f"litegpt prepare: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only file system: what is written stays, and resumes
        print(f"litegpt prepare: {exc.filename or cfg.out}: {exc.strerror or exc}; the shards finished so far "
              "are kept and the same command resumes", file=sys.stderr)
        return 1
    counts = {split: stats["samples"] for split, stats in manifest["splits"].items()}
    total = sum(counts.values())
    per_split = ", ".join(f"{split}: {n}" for split, n in counts.items())
    print(f"wrote {total} samples in {len(manifest['shards'])} shards to {cfg.out} ({per_split}); "
          f"dropped {len(manifest['dropped'])} (listed in {cfg.out / MANIFEST})")
    if total == 0:
        print("litegpt prepare: nothing usable remains", file=sys.stderr)
        return 1
    return 0
