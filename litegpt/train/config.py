"""The training recipe: one small typed config per component, read from YAML, overridden by `--set`.

Everything is validated before any heavy work starts, and the batch arithmetic (global = micro x
accumulation x world) is derived here and written into the DeepSpeed config rather than duplicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from litegpt.data.shards import read_manifest
from litegpt.grammar import TASKS
from litegpt.model.config import ConfigError, ModelConfig, Visual, build_dataclass, load_model_config


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"  # the run; this stage writes to <dir>/<stage.name>/
    seed: int = 42


@dataclass(frozen=True)
class StageSection:
    name: str = "stage1"
    tasks: tuple[str, ...] = ("identify",)  # both = the single-stage recipe (paper's open question 3)
    task_token: str | None = None  # e.g. "[grounding]" for the [identify] vs [grounding] ablation
    findings_only: bool = True  # stage 1 trains on images with local findings (paper 3.2, 4.4)
    init_from: str | None = None  # a previous stage's export/ directory (stage 2: <run>/stage1/export)


@dataclass(frozen=True)
class DataSection:
    shards: str = "shards/demo"
    split: str = "train"
    features: Visual = Visual.CACHE  # cache: frozen-encoder features built once per sample; live: encoders every step
    num_workers: int = 1
    shuffle_buffer: int = 256
    length_group: int = 8  # batches per window sorted by answer length (less padding)


@dataclass(frozen=True)
class TrainSection:
    micro_batch: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; caps the epochs
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp32 | bf16 | fp32
    max_nonfinite: int = 5  # this many non-finite steps in a row stop the run


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class CheckpointSection:
    save_every: int = 500  # optimizer steps
    keep_last: int = 3


@dataclass(frozen=True)
class LogSection:
    every: int = 10  # optimizer steps
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the device name


@dataclass(frozen=True)
class TrainConfig:
    model: str  # model config YAML (configs/model_*.yaml)
    run: RunSection = field(default_factory=RunSection)
    stage: StageSection = field(default_factory=StageSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def stage_dir(self) -> Path:
        return Path(self.run.dir) / self.stage.name

    def to_dict(self) -> dict:
        """Plain data (enums by their value), as a recipe spells it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """Hash of everything that changes what a step computes (a resumed run must match it)."""
        keep = {k: v for k, v in self.to_dict().items() if k not in ("checkpoint", "log")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe and apply `key.sub=value` overrides (values parsed as YAML), then validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        _set(data, key.strip(), value)
    return validate(build_dataclass(TrainConfig, data, str(path)))


def validate(cfg: TrainConfig) -> TrainConfig:
    checks = [
        (all(t in TASKS for t in cfg.stage.tasks) and cfg.stage.tasks, f"stage.tasks: each of {TASKS}, at least one"),
        (cfg.train.precision in ("auto", "bf16", "fp32"), "train.precision: auto, bf16 or fp32"),
        (cfg.train.micro_batch >= 1 and cfg.train.grad_accum >= 1, "train.micro_batch and grad_accum: >= 1"),
        (cfg.train.epochs >= 1, "train.epochs: >= 1"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps: >= 1 or null"),
        (cfg.data.num_workers >= 0, "data.num_workers: >= 0"),
        (cfg.checkpoint.save_every >= 1 and cfg.checkpoint.keep_last >= 1, "checkpoint.save_every/keep_last: >= 1"),
        (cfg.optim.warmup_steps >= 0 and cfg.optim.lr > 0, "optim: lr > 0, warmup_steps >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid recipe: {message}")
    return cfg


def deepspeed_config(base: dict, cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config with batch sizes and precision derived from the recipe."""
    ds = json.loads(json.dumps(base))
    derived = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch * cfg.train.grad_accum * world_size,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"DeepSpeed config sets {key}={ds[key]}, but the recipe gives {value}: batch sizes come "
                              "from the recipe (train.micro_batch, train.grad_accum); remove the key from the JSON")
        ds[key] = value
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError("DeepSpeed config enables fp16: use bf16 (or fp32 on CPU); fp16 AMP is the authors' "
                          "reference mode only")
    ds.pop("fp16", None)
    ds["zero_allow_untested_optimizer"] = True  # our client AdamW with the paper's parameter groups
    return ds


@dataclass(frozen=True)
class Recipe:
    """A stage's validated configuration."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    deepspeed: dict  # the DeepSpeed config with batch sizes and precision derived from `cfg`
    bf16: bool


def load_recipe(config: Path, overrides: list[str], deepspeed_json: Path, world_size: int) -> Recipe:
    """Everything that can be refused before ranks start (ConfigError, OSError, ValueError), refused before
    torch is imported; torch is asked only which precision the device has."""
    cfg = load_train_config(config, overrides)
    model_cfg = load_model_config(cfg.model)
    ds_base = json.loads(Path(deepspeed_json).read_text())
    check_inputs(cfg)
    deepspeed_config(ds_base, cfg, world_size, bf16=False)
    import torch

    on_gpu = torch.cuda.is_available()
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu and torch.cuda.is_bf16_supported())
    return Recipe(cfg, model_cfg, deepspeed_config(ds_base, cfg, world_size, bf16), bf16)


def check_inputs(cfg: TrainConfig) -> None:
    """Stage prerequisites that can be checked before starting ranks."""
    manifest = read_manifest(Path(cfg.data.shards))
    if cfg.data.split not in manifest["splits"] or manifest["splits"][cfg.data.split]["samples"] == 0:
        raise ValueError(f"{cfg.data.shards}: no samples in split {cfg.data.split!r}")
    if cfg.stage.init_from and not (Path(cfg.stage.init_from) / "projector.safetensors").is_file():
        raise ValueError(f"stage.init_from = {cfg.stage.init_from}: no export there; train the previous stage "
                         "first (its export is written to <run.dir>/<stage>/export when it ends)")
