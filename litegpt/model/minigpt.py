"""Initialisation from MiniGPT-v2's stage-3 checkpoint (REFERENCE_FACTS "The paper vs the authors' code").

The checkpoint (`torch.save({"model": state_dict, ...})`, any file name) holds MiniGPT-v2's trainable
weights: `llama_proj.weight/bias` (5632 -> 4096) and the q_proj/v_proj LoRA of Llama-2 under
`llama_model.base_model.model.model.layers.<i>.self_attn.<q|v>_proj.lora_<A|B>.weight` (PEFT names
without the adapter name; names with `.default` are accepted too). The key map is explicit:

    llama_proj.weight / .bias                    -> projector[2].weight / .bias (the last projector layer)
    llama_model.<peft path>.lora_A|B.weight      -> llm.<peft path>.lora_A|B.default.weight

Every target must be present with the same shape, and every checkpoint key must have a target;
otherwise the import fails naming the keys, and nothing is changed. Values are cast to our dtypes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PROJ_PREFIX = "llama_proj."
LLM_PREFIX = "llama_model."


class MiniGPTImportError(ValueError):
    """A checkpoint that does not fit this model; the message names every offending key."""


def key_map(model) -> dict[str, torch.nn.Parameter]:
    """MiniGPT-v2 checkpoint key -> our parameter, for the last projector layer and every LoRA weight."""
    last = model.projector[-1]
    mapping = {f"{PROJ_PREFIX}weight": last.weight, f"{PROJ_PREFIX}bias": last.bias}
    for name, param in model.llm.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            mapping[LLM_PREFIX + name.replace(".default.", ".")] = param
    return mapping


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MiniGPTImportError(f"MiniGPT-v2 checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise MiniGPTImportError(f"{path}: expected a dict with a 'model' state dict")
    return state


def import_minigpt(model, path: str | Path) -> list[str]:
    """Copy the checkpoint's projector and LoRA weights into `model`; returns the keys loaded."""
    state = read_checkpoint(path)
    mapping = key_map(model)
    alias = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): k for k in state}
    if len(alias) != len(state):
        raise MiniGPTImportError(f"{path}: keys collide once '.default' is dropped")
    missing = sorted(k for k in mapping if k not in alias)
    unmapped = sorted(k for k in alias if k not in mapping)
    misshaped = sorted(f"{k}: checkpoint {tuple(state[alias[k]].shape)}, model {tuple(p.shape)}"
                       for k, p in mapping.items() if k in alias and state[alias[k]].shape != p.shape)
    problems = [(f"{len(missing)} missing", missing), (f"{len(misshaped)} misshaped", misshaped),
                (f"{len(unmapped)} without a target in this model", unmapped)]
    if missing or misshaped or unmapped:
        detail = "\n".join(f"  {label}:\n" + "\n".join(f"    {k}" for k in keys) for label, keys in problems if keys)
        raise MiniGPTImportError(f"{path} does not fit this model (LoRA r/targets, projector sizes, layers?):\n"
                                 f"{detail}")
    with torch.no_grad():
        for key, param in mapping.items():
            param.copy_(state[alias[key]].to(param.dtype))
    log.info("initialised %d tensors (last projector layer + LoRA) from MiniGPT-v2 checkpoint %s", len(mapping), path)
    return sorted(mapping)
