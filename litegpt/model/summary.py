"""`litegpt model-summary`: the module tree with trainable/frozen parameter counts, built on the meta device.

Nothing is downloaded or allocated: parts come from their `arch` (or a local directory's config file),
so the paper's 7B model summarises in seconds on a laptop.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from litegpt.model.config import ModelConfig, load_model_config
from litegpt.model.model import build_model, parameter_counts


def meta_model(cfg: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(cfg, load_weights=False)


def summary_lines(model: nn.Module, depth: int) -> list[str]:
    """One line per module down to `depth` (counts include descendants), then the totals."""
    lines = [f"{'module':<64} {'trainable':>14} {'frozen':>16}"]

    def visit(module: nn.Module, name: str, level: int) -> None:
        trainable, frozen = parameter_counts(module)
        if trainable or frozen or level == 0:
            label = ("  " * level + (name or "model") + f" ({type(module).__name__})")[:64]
            lines.append(f"{label:<64} {trainable:>14,} {frozen:>16,}")
        if level < depth:
            for child_name, child in module.named_children():
                visit(child, child_name, level + 1)

    visit(model, "", 0)
    trainable, frozen = parameter_counts(model)
    lines.append(f"trainable parameters: {trainable:,}  frozen: {frozen:,}  total: {trainable + frozen:,}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model config (e.g. configs/model_paper.yaml)")
    parser.add_argument("--depth", type=int, default=3, help="module tree depth to print (default 3)")


def run(args: argparse.Namespace) -> int:
    cfg = load_model_config(args.config)
    print("\n".join(summary_lines(meta_model(cfg), args.depth)))
    return 0
