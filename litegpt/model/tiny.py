"""`litegpt tiny-weights`: write a config's random weights and a tokenizer in the real on-disk formats.

For every part of a model config whose `source` is a local directory and which has an `arch`, this
builds the part with its seed and saves it as the real loaders expect it (open_clip local dir,
transformers CLIPModel dir, transformers causal-LM dir + tokenizer), so the tiny preset exercises the same
loading code as the paper preset. It works for any config; the tiny preset is simply the one it is for.

The tokenizer is a Llama-style BPE with byte fallback (Metaspace pre-tokenizer, `<unk>`/`<s>`/`</s>` at
ids 0/1/2) trained on text rendered by the grammar (every label, instruction, coordinate and tag), so the
demo's texts tokenise compactly; byte fallback covers anything else. Same code, same files.
Each part is written to a temporary directory and renamed, so an interrupted run leaves nothing that
looks built; existing parts are kept unless `--force`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from litegpt.files import atomic_directory
from litegpt.model.config import ConfigError, EncoderConfig, ModelConfig, load_model_config, local_source, resolve_arch
from litegpt.model.encoders import OpenClipLoader, TimmLoader, loader_of, torch_dtype

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


def tokenizer_corpus() -> list[str]:
    """Deterministic training text: every prompt, label, coordinate and answer form of VinDr-CXR's grammar
    (the tiny tokenizer's vocabulary stays the same for every dataset; byte fallback spells other labels)."""
    from litegpt.grammar import Grammar
    from litegpt.labels import VINDR_CXR

    grammar, local, diagnoses = Grammar(VINDR_CXR), VINDR_CXR.local_labels, VINDR_CXR.global_labels
    lines = [grammar.prompt(task) for task in grammar.instructions]
    lines += [grammar.prompt("identify", "[grounding]"), grammar.no_findings_answer]
    for i, label in enumerate(local):
        box = [((i * 7 + j * 13) % 50) / 100 + j // 2 * 0.45 for j in range(4)]
        other = local[(i + 5) % len(local)]
        lines.append(grammar.findings([(label, box), (other, [b * 0.9 for b in box])]))
    lines += [grammar.diagnoses([g]) for g in diagnoses]
    lines += [grammar.diagnoses([a, b]) for a in diagnoses for b in diagnoses
              if VINDR_CXR.no_finding not in (a, b) and a < b]
    lines += [" ".join(f"<{n}>" for n in range(start, start + 10)) for start in range(0, 101, 10)]
    return lines * 4


def build_tokenizer(vocab_size: int):
    """A transformers fast tokenizer with at most `vocab_size` tokens (bytes included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def empty(vocab=None, merges=None) -> Tokenizer:
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        return tok

    if vocab_size < len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 64:
        raise ConfigError(f"llm.arch.vocab_size = {vocab_size} is too small for a byte-fallback tokenizer")
    trained = empty()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    trained.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = empty(vocab, merges)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right", clean_up_tokenization_spaces=False)


def _save_timm(module: nn.Module, arch: dict, directory: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / TimmLoader.weights[0]))


def _save_open_clip(module: nn.Module, arch: dict, directory: Path) -> None:
    """The open_clip local-dir format; a random projection head stands in for the unused head."""
    model_cfg = arch.get("model_cfg", arch)
    state = {OpenClipLoader.prefix + k: v.contiguous() for k, v in module.state_dict().items()}
    state["visual.head.proj.weight"] = torch.randn(model_cfg["embed_dim"], module.num_features) * 0.02
    (directory / OpenClipLoader.config_file).write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": arch.get("preprocess_cfg", {})}, indent=2))
    torch.save(state, directory / "open_clip_pytorch_model.bin")


def _save_hf(module: nn.Module, arch: dict, directory: Path) -> None:
    module.save_pretrained(str(directory))


def _save_hf_clip(module: nn.Module, arch: dict, directory: Path) -> None:
    """A whole CLIPModel directory (tiny text tower, seeded), as PubMedCLIP ships."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig
    vision = module.config
    text = CLIPTextConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                          num_hidden_layers=1, num_attention_heads=vision.num_attention_heads,
                          vocab_size=128, max_position_embeddings=16, projection_dim=vision.projection_dim,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    full.vision_model.load_state_dict(module.state_dict())
    full.save_pretrained(str(directory))


# per encoder kind: (module, arch, directory) -> the files its loader (`encoders.ENCODER_LOADERS`) reads
ENCODER_WRITERS: dict[str, Callable[[nn.Module, dict, Path], None]] = {
    "open_clip": _save_open_clip, "hf_clip": _save_hf_clip, "timm": _save_timm, "hf": _save_hf}


def write_encoder(cfg: EncoderConfig, directory: Path) -> None:
    """Build the encoder from its `arch` with seed `cfg.seed` and save it in its kind's on-disk format."""
    loader = loader_of(cfg)
    arch = resolve_arch(cfg.arch, f"encoder {cfg.name}")
    if arch is None:
        raise ConfigError(f"encoder {cfg.name}: no `arch` to build weights from")
    Path(directory).mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the unused parts the writers add (heads, text towers) too
        torch.manual_seed(cfg.seed)
        module = loader.build(arch)
        ENCODER_WRITERS[cfg.kind](module, arch, Path(directory))


def write_llm(cfg: ModelConfig, directory: Path, tokenizer: Callable[[], object] | None = None) -> None:
    """The causal LM in `llm.dtype` (as real checkpoints ship in half precision) with its tokenizer:
    `tokenizer()` when given, else `build_tokenizer` trained for the vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(resolve_arch(cfg.llm.arch, "llm"))
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    tok = tokenizer() if tokenizer is not None else build_tokenizer(config.vocab_size)
    if len(tok) > config.vocab_size:
        raise ConfigError(f"llm.arch.vocab_size = {config.vocab_size} is smaller than the tokenizer's {len(tok)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.llm.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.llm.dtype))
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))


def build_weights(cfg: ModelConfig, force: bool = False, tokenizer: Callable[[], object] | None = None) -> list[Path]:
    """Write every buildable part (local `source` + `arch`); returns the directories written. `tokenizer`
    makes the LLM's tokenizer (default: one trained by `build_tokenizer`)."""
    written = []
    parts = [(local_source(e.source), e.arch, lambda d, e=e: write_encoder(e, d)) for e in cfg.vision.encoders]
    parts.append((local_source(cfg.llm.source), cfg.llm.arch, lambda d: write_llm(cfg, d, tokenizer)))
    if cfg.llm.tokenizer is not None and cfg.llm.tokenizer != cfg.llm.source:
        raise ConfigError("llm.tokenizer: tiny weights keep the tokenizer with the LLM; leave it unset")
    for directory, arch, write in parts:
        if directory is None or arch is None or (directory.exists() and not force):
            continue
        with atomic_directory(directory) as tmp:
            write(tmp)
        written.append(directory)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model config (e.g. configs/model_tiny.yaml)")
    parser.add_argument("--force", action="store_true", help="rewrite parts that already exist")


def run(args: argparse.Namespace) -> int:
    cfg = load_model_config(args.config)
    written = build_weights(cfg, force=args.force)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("nothing to write (every local part exists; --force rewrites)")
    return 0
