"""LiteGPT: frozen encoders -> token merge -> projector -> LLM with LoRA (DESIGN.md "Model").

The model takes either per-encoder pixels (live encoders) or per-encoder features (the feature cache);
both go through the same merge and projector, and features are rounded to `vision.feature_dtype` in
both cases, so the two paths give the same loss. Its input batches come from `litegpt.model.inputs`; the
image embeddings are spliced into the batch's image slots.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from litegpt.model.config import ConfigError, LLMConfig, LoraSettings, ModelConfig, Visual, local_source, resolve_arch
from litegpt.model.encoders import VisualBackbone, backbone_geometry, torch_dtype
from litegpt.model.inputs import Batch, InputBuilder

log = logging.getLogger(__name__)


class TokenBatchNorm(nn.Module):
    """BatchNorm of every (token, channel) over the images of a batch, without affine parameters.

    Each position's feature is standardised over the data, so what all images share (the average
    chest, most of a random encoder's output) is removed and what differs between them is what the
    projector sees. Training normalises with the micro-batch's statistics (so a rank's loss never
    depends on state another rank holds); evaluation with the running ones, saved in the export.
    """

    def __init__(self, n_tokens: int, width: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_tokens * width, affine=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.training and tokens.shape[0] < 2:
            raise ValueError("merge.norm = batch needs at least 2 samples per micro-batch when training")
        return self.norm(tokens.flatten(1)).view_as(tokens)


class TokenMerge(nn.Module):
    """A norm of the concatenated tokens, then k adjacent tokens reshaped into one ([B, N, C] -> [B, N/k, kC])."""

    def __init__(self, n_tokens: int, width: int, k: int, norm: str):
        super().__init__()
        if n_tokens % k:
            raise ConfigError(f"merge.k = {k} does not divide the {n_tokens} visual tokens of the encoders; "
                              f"choose k among {[d for d in range(1, n_tokens + 1) if n_tokens % d == 0]}")
        self.n_tokens, self.width, self.k = n_tokens, width, k
        if norm == "none":
            self.norm: nn.Module = nn.Identity()
        elif norm == "batch":
            self.norm = TokenBatchNorm(n_tokens, width)
        else:
            self.norm = nn.LayerNorm(width, elementwise_affine=norm == "learnable")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, n, c = tokens.shape
        if (n, c) != (self.n_tokens, self.width):
            raise ValueError(f"visual tokens of shape {n}x{c}; this model expects {self.n_tokens}x{self.width}")
        return self.norm(tokens).reshape(batch, n // self.k, c * self.k)


class Projector(nn.Sequential):
    """Linear(kC -> hidden) -> GELU -> Linear(hidden -> D); the last layer is MiniGPT-v2's `llama_proj`."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))


@dataclass
class Generation:
    """A generated answer: its text and, per generated token (EOS excluded), id, piece and probability."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    probs: list[float]


@dataclass
class Output:
    loss: torch.Tensor  # mean over the answer tokens of the batch (a device tensor: no host sync here)


class LiteGPT(nn.Module):
    """The whole model. `vision` is None when it is built to train on cached features only."""

    def __init__(self, cfg: ModelConfig, llm: nn.Module, tokenizer, vision: VisualBackbone | None):
        super().__init__()
        self.cfg = cfg
        n_tokens, width = backbone_geometry(cfg.vision)
        self.vision = vision
        self.merge = TokenMerge(n_tokens, width, cfg.merge.k, cfg.merge.norm)
        self.llm = llm
        hidden = llm.get_input_embeddings().embedding_dim
        self.projector = Projector(width * cfg.merge.k, cfg.projector.hidden, hidden)
        self.tokenizer = tokenizer
        self.image_tokens = n_tokens // cfg.merge.k
        self.encoder_names = [e.name for e in cfg.vision.encoders]
        self.feature_dtype = torch_dtype(cfg.vision.feature_dtype)
        self.inputs = None if tokenizer is None else InputBuilder.for_model(cfg, tokenizer)

    def image_embeddings(self, visual: dict[str, torch.Tensor], source: Visual) -> torch.Tensor:
        """[B, N/k, D] embeddings from per-encoder pixels (run through the encoders) or cached features."""
        if source is Visual.LIVE:
            if self.vision is None:
                raise ValueError("this model was built without encoders; give it cached features")
            visual = self.vision(visual)
        missing = [n for n in self.encoder_names if n not in visual]
        if missing:
            raise ValueError(f"visual input lacks encoder(s) {missing}; have {sorted(visual)}")
        dtype = self.projector[0].weight.dtype
        tokens = torch.cat([visual[n].to(self.feature_dtype) for n in self.encoder_names], dim=1)
        return self.projector(self.merge(tokens.to(dtype)))

    def _embeds(self, batch: Batch) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        embeds = embed(batch.input_ids)
        images = self.image_embeddings(batch.visual, batch.source).to(embeds.dtype)
        expected = batch.image_mask.sum(dim=1)
        if not bool((expected == self.image_tokens).all()):
            raise ValueError(f"each sample needs {self.image_tokens} image slots, got {expected.tolist()}")
        return embeds.masked_scatter(batch.image_mask.unsqueeze(-1), images)

    def forward(self, batch: Batch) -> Output:
        if batch.labels is None:
            raise ValueError("a training batch needs labels; use InputBuilder.train_batch")
        out = self.llm(inputs_embeds=self._embeds(batch), attention_mask=batch.attention_mask, labels=batch.labels)
        return Output(out.loss)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 256, **generate_kwargs) -> list[Generation]:
        """Greedy unless `generate_kwargs` say otherwise; probabilities are the model's softmax at each step."""
        gen = self.llm.generate(
            inputs_embeds=self._embeds(batch), attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=generate_kwargs.pop("do_sample", False), num_beams=1, output_logits=True,
            return_dict_in_generate=True, pad_token_id=self.inputs.pad, eos_token_id=self.inputs.eos,
            **generate_kwargs)
        probs = torch.stack([F.softmax(step.float(), dim=-1) for step in gen.logits], dim=1)  # [B, T, V]
        sequences = gen.sequences[:, -probs.shape[1]:]
        chosen = probs.gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, row_probs in zip(sequences.tolist(), chosen.tolist()):
            n = row.index(self.inputs.eos) if self.inputs.eos in row else len(row)
            ids = row[:n]
            results.append(Generation(self.tokenizer.decode(ids, skip_special_tokens=True), ids,
                                      self.tokenizer.convert_ids_to_tokens(ids), row_probs[:n]))
        return results


def choose_attention(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn imports and the GPU is Ampere or newer, else sdpa."""
    if requested != "auto":
        choice, reason = requested, "as configured"
    elif importlib.util.find_spec("flash_attn") is None:
        choice, reason = "sdpa", "flash-attn is not installed"
    elif not torch.cuda.is_available():
        choice, reason = "sdpa", "no CUDA device"
    elif torch.cuda.get_device_capability()[0] < 8:
        choice, reason = "sdpa", "the GPU predates Ampere (flash-attention 2 needs sm80+)"
    else:
        try:
            import flash_attn  # noqa: F401
            choice, reason = "flash_attention_2", "flash-attn imports and the GPU supports it"
        except ImportError as exc:
            choice, reason = "sdpa", f"flash-attn fails to import ({exc})"
    log.info("attention implementation: %s (%s)", choice, reason)
    return choice


def _check_local(source: str, what: str) -> None:
    """A local `source` must exist (a hub id is left to transformers)."""
    path = local_source(source)
    if path is not None and not path.exists():
        raise ConfigError(f"{what} {source} does not exist (for a tiny preset, build it with "
                          "`litegpt tiny-weights --config <model config>`)")


def build_llm(cfg: LLMConfig, lora: LoraSettings | None, load_weights: bool = True) -> nn.Module:
    """The causal LM (weights from `source`, or random from `arch`), with LoRA if configured; base frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = torch.empty(0).device.type == "meta"
    attn = "sdpa" if meta else choose_attention(cfg.attn_implementation)
    dtype = torch_dtype(cfg.dtype)
    if load_weights and cfg.source is not None and not meta:
        _check_local(cfg.source, "llm.source")
        kwargs = {}
        if cfg.load_in_8bit:
            kwargs["quantization_config"] = _eight_bit_config()
        model = AutoModelForCausalLM.from_pretrained(cfg.source, dtype=dtype, attn_implementation=attn, **kwargs)
    else:
        arch = resolve_arch(cfg.arch, "llm")
        if arch is None:
            if cfg.source is None:
                raise ConfigError("llm: neither `source` nor `arch` is given")
            _check_local(cfg.source, "llm.source")
            config = AutoConfig.from_pretrained(cfg.source)
        else:
            arch = dict(arch)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        # Random weights are made where they will run: on a GPU a 7B model initialises in seconds there.
        gpu = [] if meta or not torch.cuda.is_available() else [torch.cuda.current_device()]
        with torch.random.fork_rng(devices=gpu), torch.device(f"cuda:{gpu[0]}" if gpu else torch.empty(0).device):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.requires_grad_(False)
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_8bit:
        model = prepare_model_for_kbit_training(model)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules),
                                            modules_to_save=list(lora.modules_to_save) or None, task_type="CAUSAL_LM"))


def _eight_bit_config():
    """LLM.int8 as the authors load Llama-2 (reference mode only)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("llm.load_in_8bit needs the bitsandbytes package (pip install bitsandbytes)")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        warnings.warn("8-bit (LLM.int8) training is known to break on Hopper GPUs; prefer bf16", stacklevel=3)
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(cfg: LLMConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.source
    if source is None:
        raise ConfigError("llm: a tokenizer needs `tokenizer` or `source`")
    _check_local(source, "tokenizer")
    return AutoTokenizer.from_pretrained(source)


def build_model(cfg: ModelConfig, *, load_weights: bool = True, with_encoders: bool = True) -> LiteGPT:
    """The model on the current default device; under `torch.device("meta")` no weights are read.

    `with_encoders=False` leaves the encoders out (training on cached features). The MiniGPT-v2
    checkpoint, if configured, initialises the last projector layer and the LoRA weights.
    """
    meta = torch.empty(0).device.type == "meta"
    load = load_weights and not meta
    backbone_geometry(cfg.vision)  # refuse inconsistent encoders before loading anything
    vision = VisualBackbone(cfg.vision, load_weights=load) if with_encoders else None
    llm = build_llm(cfg.llm, cfg.lora, load_weights=load)
    tokenizer = load_tokenizer(cfg.llm) if not meta else None
    model = LiteGPT(cfg, llm, tokenizer, vision)
    model.projector.to(torch_dtype(cfg.llm.dtype))
    model.merge.to(torch_dtype(cfg.llm.dtype))
    if load and cfg.minigpt_checkpoint:
        from litegpt.model.minigpt import import_minigpt
        import_minigpt(model, cfg.minigpt_checkpoint)
    return model


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable
