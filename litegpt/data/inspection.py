"""`litegpt inspect`: what is in a shard set, as a table, and samples drawn with their boxes for a look by eye."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from litegpt.data.integrity import verify_shard_set
from litegpt.data.shards import SPLITS, ShardError, iter_samples, read_manifest
from litegpt.labels import Vocabulary

# One distinct colour per local label (tab20-like palette, cycled), so a picture can be read without a legend.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
]


def label_colour(label: str, local_labels: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """The colour of a label: by its index among `local_labels` (the vocabulary's), one colour for any other."""
    index = local_labels.index(label) if label in local_labels else len(local_labels)
    return _PALETTE[index % len(_PALETTE)]


def draw_boxes(image: Image.Image, boxes: list[tuple[str, list[float]]], colour=None, width: int | None = None,
               local_labels: tuple[str, ...] = ()) -> Image.Image:
    """Draw labelled boxes given in normalised 0..1 coordinates on an RGB copy of `image`; without `colour`,
    each label in its colour by its place in `local_labels`."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line = width or max(2, round(max(w, h) / 300))
    font = ImageFont.load_default(size=max(12, round(max(w, h) / 50)))
    for label, (x0, y0, x1, y1) in boxes:
        rgb = colour or label_colour(label, local_labels)
        rect = (x0 * w, y0 * h, x1 * w, y1 * h)
        draw.rectangle(rect, outline=rgb, width=line)
        text_box = draw.textbbox((rect[0], rect[1]), label, font=font)
        top = rect[1] - (text_box[3] - text_box[1]) - 2 * line
        anchor = (rect[0], top if top >= 0 else rect[3] + line)
        bg = draw.textbbox(anchor, label, font=font)
        draw.rectangle(bg, fill=(0, 0, 0))
        draw.text(anchor, label, fill=rgb, font=font)
    return canvas


def summary(manifest: dict) -> str:
    """The manifest as text: source, vocabulary, parameters, shards, and the per-label image/box table."""
    vocabulary = Vocabulary.of_manifest(manifest)
    lines = [
        f"format {manifest['format']}, litegpt {manifest['litegpt_version']}, layout {manifest['source']['layout']}",
        f"labels: {vocabulary.describe()}",
        "params: " + ", ".join(f"{k}={v}" for k, v in manifest["params"].items() if k not in ("vocabulary", "template")),
        f"shards: {len(manifest['shards'])}; dropped inputs: {len(manifest['dropped'])}",
    ]
    splits = [s for s in SPLITS if s in manifest["splits"]]
    for split in splits:
        stats = manifest["splits"][split]
        lines.append(f"{split}: {stats['samples']} images, {stats['images_with_findings']} with local findings")
    width = max(22, *(len(label) + 2 for label in vocabulary.all_labels))
    header = f"{'label':<{width}}" + "".join(f"{s + ' img':>11}{s + ' box':>11}" for s in splits)
    lines += ["", header, "-" * len(header)]
    for label in vocabulary.all_labels:
        row = f"{label:<{width}}"
        for split in splits:
            stats = manifest["splits"][split]
            boxes = stats["boxes"].get(label, 0) if label in vocabulary.local_labels else "-"
            row += f"{stats['images'].get(label, 0):>11}{boxes:>11}"
        lines.append(row)
    if manifest["dropped"]:
        kinds: dict[str, int] = {}
        for d in manifest["dropped"]:
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        lines += ["", "dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))]
        lines += [f"  {d['split']}/{d['image_id']}: {d['reason']}" for d in manifest["dropped"][:10]]
        if len(manifest["dropped"]) > 10:
            lines.append(f"  ... {len(manifest['dropped']) - 10} more in manifest.json")
    return "\n".join(lines)


def draw_samples(directory: Path, out: Path, count: int, split: str) -> list[Path]:
    """The first `count` samples of `split` that have findings (others if too few), boxes drawn."""
    local_labels = Vocabulary.of_manifest(read_manifest(directory)).local_labels
    out.mkdir(parents=True, exist_ok=True)
    chosen, plain = [], []
    for sample in iter_samples(directory, split):
        (chosen if sample["json"]["findings"] else plain).append(sample)
        if len(chosen) >= count:
            break
    written = []
    for sample in (chosen + plain)[:count]:
        meta = sample["json"]
        picture = draw_boxes(sample["png"], [(f["label"], f["box"]) for f in meta["findings"]],
                             local_labels=local_labels)
        path = out / f"{meta['image_id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)  # csv/coco ids may have folders: "images/p001"
        picture.save(path)
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", type=Path, help="shard directory written by `litegpt prepare`")
    parser.add_argument("--draw", type=int, default=0, metavar="N", help="write N samples as PNGs with their boxes")
    parser.add_argument("--draw-dir", type=Path, default=None, help="where to write them (default <shards>/inspect)")
    parser.add_argument("--split", choices=SPLITS, default="train")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = read_manifest(args.shards)
        print(summary(manifest))
        verify_shard_set(args.shards, manifest=manifest)
        if args.draw:
            paths = draw_samples(args.shards, args.draw_dir or args.shards / "inspect", args.draw, args.split)
            print(f"\ndrew {len(paths)} samples with their boxes:")
            print("\n".join(f"  {p}" for p in paths))
    except ShardError as exc:
        print(f"litegpt inspect: {exc}", file=sys.stderr)
        return 1
    return 0
