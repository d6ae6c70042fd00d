"""A stage's export: everything inference needs besides the public base weights.

`export/adapter/` is the PEFT adapter (adapter_config.json + adapter_model.safetensors), `projector.safetensors`
holds the projector and token-merge weights, `model.yaml` the model config, `export.json` where it came
from. Stage 2 starts from stage 1's export; `litegpt predict` and `evaluate` load it on the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from litegpt import __version__
from litegpt.files import atomic_directory

ADAPTER, VISUAL, CONFIG, INFO = "adapter", "projector.safetensors", "model.yaml", "export.json"


def _visual_state(model) -> dict[str, torch.Tensor]:
    state = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    state.update({f"merge.{k}": v for k, v in model.merge.state_dict().items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_export(model, out: Path, info: dict) -> None:
    """Write the export (rank 0 only; ZeRO-2 keeps full weights on every rank)."""
    with atomic_directory(out) as tmp:
        model.llm.save_pretrained(tmp / ADAPTER)
        save_file(_visual_state(model), tmp / VISUAL)
        (tmp / CONFIG).write_text(yaml.safe_dump(model.cfg.to_dict(), sort_keys=False))
        (tmp / INFO).write_text(json.dumps({**info, "litegpt_version": __version__}, indent=1))


def load_export(model, directory: Path) -> dict:
    """Load an export's adapter and projector into `model` (same architecture); every key must match."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    missing = [p for p in (directory / ADAPTER / "adapter_model.safetensors", directory / VISUAL) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a litegpt export (missing {', '.join(map(str, missing))}); "
                                "it is written at the end of each stage under <run>/<stage>/export")
    adapter = load_file(directory / ADAPTER / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model.llm, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{directory}: adapter keys that this model does not have: {unexpected[:5]}")
    visual = load_file(directory / VISUAL)
    model.projector.load_state_dict({k[len("projector."):]: v for k, v in visual.items() if k.startswith("projector.")})
    model.merge.load_state_dict({k[len("merge."):]: v for k, v in visual.items() if k.startswith("merge.")})
    return json.loads((directory / INFO).read_text())
