"""The `litegpt` command: one subcommand per module, each module owning its own arguments.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only when
its command runs, so `litegpt synth` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("litegpt.data.synth", "write a synthetic dataset: VinDr-CXR (PhysioNet or Kaggle layout), a box CSV or COCO"),
    "prepare": ("litegpt.data.prepare", "convert a dataset root (VinDr-CXR, a box CSV or COCO) into WebDataset shards"),
    "inspect": ("litegpt.data.inspection", "summarise a shard set and draw samples with their boxes"),
    "tiny-weights": ("litegpt.model.tiny", "write a model config's random weights and tokenizer in the real on-disk formats"),
    "reduced-weights": ("litegpt.model.reduced", "write a model config at fewer decoder layers, with random weights in the real formats (the paper's shapes on CPU)"),
    "model-summary": ("litegpt.model.summary", "print the model's modules with trainable/frozen parameter counts (no weights loaded)"),
    "cache-features": ("litegpt.features", "run the frozen encoders once over a shard set and write the feature cache"),
    "evaluate": ("litegpt.eval.evaluate", "generate on a shard split with a trained stage and write predictions, metrics and a report"),
    "predict": ("litegpt.eval.predict", "run a trained stage on one DICOM/PNG/JPEG: findings, boxes and diagnoses as JSON, plus an overlay"),
    "demo": ("litegpt.demo", "the whole pipeline on the tiny preset and synthetic data, model beside a prior baseline"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="litegpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Parse only the command name first, then let its module define the rest.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)
        return 2
    from litegpt.distributed import setup_logging

    setup_logging()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"litegpt {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
