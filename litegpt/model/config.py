"""The model config schema: small frozen dataclasses read from YAML, with unknown keys refused.

A model config says where every weight comes from (hub id, local directory, or nothing = seeded random
init) and, optionally, each part's architecture (`arch`) so the model can be built without its weights:
on the meta device for `litegpt model-summary`, or with random weights for the tiny preset and the
benchmarks. `arch` is either an inline mapping or the name of a JSON file shipped in `litegpt/model/configs/`.
Relative local paths are read relative to the current directory (the repository root for the CLI).
Nothing here, nor anywhere else, depends on a preset's name: presets are just files in `configs/`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = ("float32", "float16", "bfloat16")
PACKAGED_CONFIGS = resources.files("litegpt.model").joinpath("configs")
HUB_PREFIX = "hf-hub:"  # open_clip's spelling of a hub id


class ConfigError(ValueError):
    """A model config that cannot describe a working model; the message says which key and why."""


def local_source(source: str | None) -> Path | None:
    """The local directory a `source` names (it may not exist yet), or None for no source or a hub repository.

    An existing directory is local; otherwise a source is local if it starts with ".", "/" or "~" or has more
    than one "/" (a hub id is `name` or `org/name`, for open_clip `hf-hub:org/name`).
    """
    if source is None:
        return None
    path = Path(source.removeprefix(HUB_PREFIX)).expanduser()
    if path.is_dir():
        return path
    if source.startswith(HUB_PREFIX) or not (source.startswith((".", "/", "~")) or source.count("/") > 1):
        return None
    return path


class Visual(str, enum.Enum):
    """Where a sample's visual input comes from, spelled as recipes and the command line spell it: `cache`
    = per-encoder features from the feature cache, `live` = per-encoder pixels run through the encoders."""

    CACHE = "cache"
    LIVE = "live"


@dataclass(frozen=True)
class EncoderConfig:
    """One frozen image encoder. `kind` picks the loader (see `litegpt.model.encoders.ENCODER_LOADERS`)."""

    name: str
    kind: str
    source: str | None = None  # hub id (open_clip: "hf-hub:org/repo"), local directory, or None = random init
    arch: dict | str | None = None  # architecture for building without weights (inline or packaged JSON name)
    seed: int = 0  # random init only
    image_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    layer: int | None = None  # None: the encoder's final token output; int: that hidden state / block index
    drop_prefix_tokens: int | None = None  # None: the kind's default (timm: its prefix tokens, CLIP: 1)


@dataclass(frozen=True)
class VisionConfig:
    encoders: tuple[EncoderConfig, ...]
    dtype: str = "float16"  # the encoders' compute dtype
    feature_dtype: str = "float16"  # features are rounded to this, live or cached, so both paths agree


@dataclass(frozen=True)
class MergeConfig:
    k: int = 5  # adjacent tokens merged into one
    # frozen: parameter-free LayerNorm over channels (the authors'); learnable: affine LayerNorm; batch:
    # BatchNorm of every token position and channel (random tiny encoders, see model.TokenBatchNorm); none
    norm: str = "frozen"


@dataclass(frozen=True)
class ProjectorConfig:
    hidden: int = 5632


@dataclass(frozen=True)
class LLMConfig:
    source: str | None = None  # hub id or local directory (weights + tokenizer); None = random init from arch
    arch: dict | str | None = None
    tokenizer: str | None = None  # defaults to `source`
    seed: int = 0
    dtype: str = "bfloat16"
    attn_implementation: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    load_in_8bit: bool = False  # the authors' reference mode; needs bitsandbytes
    max_length: int = 2048  # whole sequence (image + prompt + answer) in tokens
    max_answer_tokens: int = 1024


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # Modules trained in full and saved with the adapter (peft's modules_to_save), e.g. embed_tokens and
    # lm_head for a small model that has to learn its vocabulary; empty for the paper.
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    llm: LLMConfig
    merge: MergeConfig = field(default_factory=MergeConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    minigpt_checkpoint: str | None = None  # MiniGPT-v2 stage-3 checkpoint: last projector layer + q/v LoRA

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from plain data, refusing unknown keys and wrong types with the key's path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    if hint is dict and isinstance(value, dict):
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(str(m.value) for m in hint)}") from None
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _validate(cfg: ModelConfig) -> ModelConfig:
    names = [e.name for e in cfg.vision.encoders]
    if not names:
        raise ConfigError("vision.encoders: at least one encoder is needed")
    if len(set(names)) != len(names):
        raise ConfigError(f"vision.encoders: names must be unique, got {names}")
    for dtype_key, value in (("vision.dtype", cfg.vision.dtype), ("vision.feature_dtype", cfg.vision.feature_dtype),
                             ("llm.dtype", cfg.llm.dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{dtype_key}: {value!r} is not one of {', '.join(DTYPES)}")
    if cfg.merge.k < 1:
        raise ConfigError(f"merge.k: must be >= 1, got {cfg.merge.k}")
    if cfg.merge.norm not in ("frozen", "learnable", "batch", "none"):
        raise ConfigError(f"merge.norm: {cfg.merge.norm!r} is not one of frozen, learnable, batch, none")
    if cfg.llm.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
        raise ConfigError(f"llm.attn_implementation: {cfg.llm.attn_implementation!r} is not one of "
                          "auto, flash_attention_2, sdpa, eager")
    return cfg


def model_config_from_dict(data: dict, where: str = "model config") -> ModelConfig:
    return _validate(build_dataclass(ModelConfig, data, where))


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: model config not found")
    return model_config_from_dict(parse_yaml(path.read_text(), str(path)), str(path))


def parse_yaml(text: str, where: str) -> Any:
    """YAML to plain data; a syntax error is a one-line ConfigError naming `where` and the line, not a parser
    traceback (configs and recipes are hand-edited)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None


def resolve_arch(arch: dict | str | None, where: str) -> dict | None:
    """An inline architecture as is, or a packaged JSON file (`litegpt/model/configs/<name>`) read."""
    if arch is None or isinstance(arch, dict):
        return arch
    try:
        text = PACKAGED_CONFIGS.joinpath(arch).read_text()
    except FileNotFoundError:
        packaged = sorted(p.name for p in PACKAGED_CONFIGS.iterdir() if p.name.endswith(".json"))
        raise ConfigError(f"{where}.arch: no packaged config {arch!r}; packaged: {', '.join(packaged)}") from None
    return json.loads(text)
