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
import os
import shutil
from pathlib import Path

import torch

from litegpt.model.config import ConfigError, ModelConfig, load_model_config, resolve_arch
from litegpt.model.encoders import save_encoder

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


def tokenizer_corpus() -> list[str]:
    """Deterministic training text: every prompt, label, coordinate and answer form of the grammar."""
    from litegpt import grammar
    from litegpt.labels import GLOBAL_LABELS, LOCAL_LABELS, NO_FINDING

    lines = [grammar.render_prompt(task) for task in grammar.INSTRUCTIONS]
    lines += [grammar.render_prompt("identify", "[grounding]"), grammar.NO_FINDINGS_ANSWER]
    for i, label in enumerate(LOCAL_LABELS):
        box = [((i * 7 + j * 13) % 50) / 100 + j // 2 * 0.45 for j in range(4)]
        other = LOCAL_LABELS[(i + 5) % len(LOCAL_LABELS)]
        lines.append(grammar.render_findings([(label, box), (other, [b * 0.9 for b in box])]))
    lines += [grammar.render_diagnoses([g]) for g in GLOBAL_LABELS]
    lines += [grammar.render_diagnoses([a, b]) for a in GLOBAL_LABELS for b in GLOBAL_LABELS
              if NO_FINDING not in (a, b) and a < b]
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


def _write_atomic(directory: Path, write) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local(source: str | None) -> Path | None:
    if source is None or source.startswith("hf-hub:") or not source.startswith((".", "/", "~")):
        return None
    return Path(source).expanduser()


def write_llm(cfg: ModelConfig, directory: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(resolve_arch(cfg.llm.arch, "llm"))
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    tokenizer = build_tokenizer(config.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.llm.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def build_weights(cfg: ModelConfig, force: bool = False) -> list[Path]:
    """Write every buildable part (local `source` + `arch`); returns the directories written."""
    written = []
    parts = [(_local(e.source), e.arch, lambda d, e=e: save_encoder(e, d)) for e in cfg.vision.encoders]
    parts.append((_local(cfg.llm.source), cfg.llm.arch, lambda d: write_llm(cfg, d)))
    if cfg.llm.tokenizer is not None and cfg.llm.tokenizer != cfg.llm.source:
        raise ConfigError("llm.tokenizer: tiny weights keep the tokenizer with the LLM; leave it unset")
    for directory, arch, write in parts:
        if directory is None or arch is None or (directory.exists() and not force):
            continue
        directory.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory, write)
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
