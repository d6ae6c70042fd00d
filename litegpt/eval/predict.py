"""`litegpt predict`: a trained stage on one new image -> findings with boxes and diagnoses as JSON, and an overlay.

    litegpt predict image.dcm --run runs/<run>/<stage> [--out overlay.png] [--task identify|vqa|both]

The file goes through prepare's conversion (`convert_dicom`; PNG/JPEG/TIFF/BMP by their suffix through
`convert_image_file`), longer side at most `--max-side` (1024, as prepare), then the live encoders and
the same generation as `litegpt evaluate`. A DICOM whose header claims more than `--max-pixels` values is
refused before it is decoded (PNG/JPEG inputs have Pillow's own MAX_IMAGE_PIXELS). Boxes are given
normalised (0..1, as the model says them) and in the ORIGINAL image's pixels (`box_px`, what a viewer
needs to draw them on the DICOM), each with a confidence: the mean probability of the tokens that wrote
it (`inference.box_scores`). Labels are the export's vocabulary's (the stage's grammar parses the text;
diagnoses come in its vocabulary's order). JSON goes to stdout and nothing else does; the overlay (the
converted image with the boxes) beside the input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from litegpt.data.dicom import MAX_PIXELS, ConvertConfig, ConvertedImage, DicomError, convert_dicom, convert_image_file
from litegpt.data.inspection import draw_boxes
from litegpt.eval import inference
from litegpt.eval.inference import Decoding, TrainedStage
from litegpt.grammar import TASKS
from litegpt.model.config import ConfigError, Visual

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def convert(path: Path, max_side: int, max_pixels: int = MAX_PIXELS) -> ConvertedImage:
    """The image as prepare would store it; raises DicomError naming the file when it cannot be read."""
    if not path.is_file():
        raise DicomError(f"{path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return convert_image_file(path, max_side)
    return convert_dicom(path, ConvertConfig(max_side=max_side, max_pixels=max_pixels))


def predict(model, stage: TrainedStage, image: ConvertedImage, tasks: Sequence[str], decoding: Decoding) -> dict:
    """The findings (label, box_norm, box_px, confidence), diagnoses, raw texts and unread fragments."""
    pixels = model.vision.preprocess(Image.fromarray(image.pixels))
    result: dict = {"findings": [], "diagnoses": [], "text": {}, "unparsed": []}
    labels: set[str] = set()
    for task in tasks:
        (generation,) = inference.generate(model, stage, task, ["input"], [pixels], Visual.LIVE, decoding, chunk=0)
        parsed = stage.grammar.parse(generation.text)
        scores = inference.box_scores(model.tokenizer, generation, stage.grammar)
        for (label, box), confidence in zip(parsed.findings, scores):
            norm = [v / 100 for v in box]
            scale = (image.cols, image.rows, image.cols, image.rows)
            result["findings"].append({"label": label, "box_norm": norm,
                                       "box_px": [round(v * s) for v, s in zip(norm, scale)],
                                       "confidence": confidence})
        labels.update(parsed.labels)
        result["text"][task] = generation.text
        result["unparsed"] += [{"task": task, "fragment": f} for f in parsed.unparsed]
    result["diagnoses"] = [g for g in stage.grammar.vocabulary.global_labels if g in labels]
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a DICOM, PNG or JPEG chest radiograph")
    parser.add_argument("--run", type=Path, required=True, help="a trained stage, e.g. runs/tiny/stage2")
    parser.add_argument("--out", type=Path, default=None,
                        help="overlay PNG (default: <file stem>.overlay.png beside the file)")
    parser.add_argument("--task", choices=(*TASKS, "both"), default=None, help="default: the tasks the stage trained")
    parser.add_argument("--max-side", type=int, default=1024, help="longer side after conversion (default 1024)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"refuse a DICOM claiming more values (rows x columns x samples x frames) before "
                             f"decoding it (default {MAX_PIXELS:,}, 8192 x 8192)")
    inference.add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_pixels < 1:
        print(f"litegpt predict: --max-pixels must be >= 1, got {args.max_pixels}", file=sys.stderr)
        return 2
    try:
        decoding = inference.decoding_from_args(args)
        image = convert(args.file, args.max_side, args.max_pixels)
        stage = inference.load_stage(args.run)
        tasks = stage.tasks if args.task is None else TASKS if args.task == "both" else (args.task,)
        model = inference.load_model(stage, with_encoders=True, device=inference.inference_device())
    except (DicomError, inference.EvalError, ConfigError, FileNotFoundError) as exc:
        print(f"litegpt predict: {exc}", file=sys.stderr)
        return 1
    result = {"file": str(args.file), **predict(model, stage, image, tasks, decoding)}
    overlay = args.out or args.file.with_name(f"{args.file.stem}.overlay.png")
    boxes = [(f["label"], f["box_norm"]) for f in result["findings"]]
    draw_boxes(Image.fromarray(image.pixels), boxes, local_labels=stage.grammar.vocabulary.local_labels).save(overlay)
    result["overlay"] = str(overlay)
    print(json.dumps(result, indent=1))
    return 0
