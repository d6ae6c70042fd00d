"""A stage's export: everything inference needs besides the public base weights.

`export/adapter/` is the PEFT adapter (adapter_config.json + adapter_model.safetensors), `projector.safetensors`
holds the projector and token-merge weights, `model.yaml` the model config, `export.json` where it came
from, the text it was trained on (`vocabulary` and `template`, its shard set's `Grammar.to_dict()`; exports
without them are VinDr-CXR's) and the sha256 of every other file (`files`). Stage 2 starts from stage 1's
export (on shards of the same vocabulary); `litegpt predict` and `evaluate` load it on the base model.
`load_export` checks the hashes first, so a truncated or altered file is refused by name instead of failing
inside safetensors or, worse, loading garbage. Non-finite weights or batch-norm statistics are never exported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from litegpt import __version__
from litegpt.files import atomic_directory, sha256_file
from litegpt.model.config import ConfigError

ADAPTER, VISUAL, CONFIG, INFO = "adapter", "projector.safetensors", "model.yaml", "export.json"
ADAPTER_WEIGHTS = f"{ADAPTER}/adapter_model.safetensors"
REEXPORT = ("re-export it: re-run the stage's training with --resume auto, which restores its last checkpoint "
            "and writes the export again")


class ExportError(ConfigError):
    """An export that is damaged or altered, or weights that must not be exported; the message names the file."""


def _visual_state(model) -> dict[str, torch.Tensor]:
    state = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    state.update({f"merge.{k}": v for k, v in model.merge.state_dict().items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _refuse_nonfinite(out: Path, state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ExportError(f"{out}: not exported: non-finite values in {', '.join(bad[:5])}{more} (training diverged "
                          "or read non-finite features); the previous export, if any, is kept")


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of an export but export.json, by path relative to it."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(Path(directory).rglob("*"))
            if p.is_file() and p.name != INFO}


def save_export(model, out: Path, info: dict) -> None:
    """Write the export (rank 0 only; ZeRO-2 keeps full weights on every rank)."""
    from peft import get_peft_model_state_dict

    visual = _visual_state(model)
    _refuse_nonfinite(out, {**visual, **get_peft_model_state_dict(model.llm)})
    with atomic_directory(out) as tmp:
        model.llm.save_pretrained(tmp / ADAPTER)
        save_file(visual, tmp / VISUAL)
        (tmp / CONFIG).write_text(yaml.safe_dump(model.cfg.to_dict(), sort_keys=False))
        info = {**info, "litegpt_version": __version__, "files": file_hashes(tmp)}
        (tmp / INFO).write_text(json.dumps(info, indent=1))


def verify_export(directory: Path) -> dict:
    """export.json, after checking every file it records; exports that predate the hashes pass with a warning."""
    directory = Path(directory)
    info = json.loads((directory / INFO).read_text())
    recorded = info.get("files")
    if recorded is None:
        logging.getLogger(__name__).warning(
            f"{directory}: export.json records no file hashes (written by litegpt {info.get('litegpt_version', '?')}); "
            "damaged files cannot be detected: re-export it to add them")
        return info
    problems = {name: "missing" if not (directory / name).is_file() else "sha256 differs from export.json's"
                for name, digest in recorded.items()
                if not (directory / name).is_file() or sha256_file(directory / name) != digest}
    if problems:
        raise ExportError(f"{directory}: damaged or altered export file(s): "
                          + "; ".join(f"{name} ({why})" for name, why in problems.items()) + f"; {REEXPORT}")
    return info


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: unreadable ({exc}); {REEXPORT}") from None


def load_export(model, directory: Path) -> dict:
    """Load an export's adapter and projector into `model` (same architecture); every key must match."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    missing = [p for p in (directory / ADAPTER_WEIGHTS, directory / VISUAL, directory / INFO) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a litegpt export (missing {', '.join(map(str, missing))}); "
                                "it is written at the end of each stage under <run>/<stage>/export")
    info = verify_export(directory)
    adapter = _load(directory / ADAPTER_WEIGHTS)
    try:
        result = set_peft_model_state_dict(model.llm, adapter)
    except RuntimeError as exc:  # shapes of another architecture
        raise ExportError(f"{directory / ADAPTER_WEIGHTS}: does not fit this model ({' '.join(str(exc).split())})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ExportError(f"{directory / ADAPTER_WEIGHTS}: keys that this model does not have: {unexpected[:5]}")
    visual = _load(directory / VISUAL)
    try:
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in visual.items()
                                         if k.startswith("projector.")})
        model.merge.load_state_dict({k[len("merge."):]: v for k, v in visual.items() if k.startswith("merge.")})
    except RuntimeError as exc:
        raise ExportError(f"{directory / VISUAL}: does not fit this model ({' '.join(str(exc).split())})") from None
    return info
