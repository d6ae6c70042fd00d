"""The training recipe: one small typed config per component, read from YAML, overridden by `--set`.

Everything is validated before any heavy work starts, and the batch arithmetic (global = micro x
accumulation x world) is derived here and written into the DeepSpeed config rather than duplicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from litegpt.data.shards import MANIFEST, read_manifest
from litegpt.data.splits import Holdout, choose_holdout
from litegpt.grammar import TASKS, Grammar
from litegpt.labels import VocabularyError
from litegpt.model.config import ConfigError, ModelConfig, Visual, build_dataclass, load_model_config, parse_yaml


@dataclass(frozen=True)
class Rule:
    """What a recipe value must be to work (`ok`), in words; it sits beside its field as field metadata."""

    ok: Callable[[Any], bool]
    wanted: str


def _rule(ok: Callable[[Any], bool], wanted: str) -> dict:
    return {"rule": Rule(ok, wanted)}


def _at_least(low: int) -> dict:
    return _rule(lambda v: math.isfinite(v) and v >= low, f">= {low}")


_POSITIVE = _rule(lambda v: math.isfinite(v) and v > 0, "> 0 (and finite)")


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"  # the run; this stage writes to <dir>/<stage.name>/
    seed: int = field(default=42, metadata=_rule(lambda v: 0 <= v < 2**32, "in [0, 2**32)"))  # numpy's range
    # Internal, for robustness checks: each trainable initial weight w becomes w * (1 + perturb_init * z),
    # z ~ N(0, 1) drawn from perturb_seed, standing in for another CPU's rounding (0: off; fp32 rounding ~ 6e-8).
    perturb_init: float = field(default=0.0, metadata=_at_least(0))
    perturb_seed: int = field(default=0, metadata=_rule(lambda v: 0 <= v < 2**63, "in [0, 2**63)"))


@dataclass(frozen=True)
class StageSection:
    name: str = "stage1"
    # both = the single-stage recipe (paper's open question 3)
    tasks: tuple[str, ...] = field(default=("identify",), metadata=_rule(
        lambda v: bool(v) and all(t in TASKS for t in v), f"one or more of {', '.join(TASKS)}"))
    task_token: str | None = None  # e.g. "[grounding]" for the [identify] vs [grounding] ablation
    findings_only: bool = True  # stage 1 trains on images with local findings (paper 3.2, 4.4)
    init_from: str | None = None  # a previous stage's export/ directory (stage 2: <run>/stage1/export)


@dataclass(frozen=True)
class DataSection:
    shards: str = "shards/demo"
    split: str = "train"
    features: Visual = Visual.CACHE  # cache: frozen-encoder features built once per sample; live: encoders every step
    num_workers: int = field(default=1, metadata=_at_least(0))
    shuffle_buffer: int = field(default=256, metadata=_at_least(0))  # 0: no shuffling within shards
    # batches per window sorted by answer length (less padding); 0 would never fill a window: a silent hang
    length_group: int = field(default=8, metadata=_at_least(1))


@dataclass(frozen=True)
class TrainSection:
    micro_batch: int = field(default=4, metadata=_at_least(1))
    grad_accum: int = field(default=1, metadata=_at_least(1))
    epochs: int = field(default=1, metadata=_at_least(1))
    max_steps: int | None = field(default=None, metadata=_at_least(1))  # optimizer steps; caps the epochs
    # auto: bf16 on a GPU that has it, else fp32
    precision: str = field(default="auto", metadata=_rule(lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"))
    # this many non-finite steps in a row stop the run (0 would stop it after its first step)
    max_nonfinite: int = field(default=5, metadata=_at_least(1))


@dataclass(frozen=True)
class OptimSection:
    lr: float = field(default=1e-5, metadata=_POSITIVE)
    min_lr: float = field(default=1e-5, metadata=_at_least(0))  # the cosine's floor
    warmup_lr: float = field(default=1e-5, metadata=_at_least(0))  # the linear warmup's start
    warmup_steps: int = field(default=1000, metadata=_at_least(0))
    weight_decay: float = field(default=0.05, metadata=_at_least(0))  # AdamW's; negative would grow the weights
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_rule(
        lambda v: all(0 <= b < 1 for b in v), "two values in [0, 1)"))  # Adam's moment decay


@dataclass(frozen=True)
class CheckpointSection:
    save_every: int = field(default=500, metadata=_at_least(1))  # optimizer steps
    keep_last: int = field(default=3, metadata=_at_least(1))


@dataclass(frozen=True)
class LogSection:
    every: int = field(default=10, metadata=_at_least(1))  # optimizer steps
    # per device, for MFU; None: looked up from the device name
    peak_tflops: float | None = field(default=None, metadata=_POSITIVE)


@dataclass(frozen=True)
class Figure:
    """A figure validation reports, as `eval.best` may choose it."""

    generated: bool  # scored on generations (needs eval.generate > 0)
    task: str | None  # the task whose generations give it; None: any
    higher_is_better: bool


# What `litegpt.eval.validation` reports, named as `litegpt evaluate` names them in TensorBoard (under eval/):
# the teacher-forced loss, and the parse rate and micro-F1s of greedy generations (strict: the grammar's
# whole-word labels and one-to-one boxes; reference: the authors' substring rule).
VALIDATION_FIGURES = {
    "loss": Figure(False, None, False),
    "parse/all_rate": Figure(True, None, True),
    "strict/local/micro_avg_f1": Figure(True, "identify", True),
    "reference/local/micro_avg_f1": Figure(True, "identify", True),
    "strict/box_f1@0.5": Figure(True, "identify", True),
    "strict/global/micro_avg_f1": Figure(True, "vqa", True),
    "reference/global/micro_avg_f1": Figure(True, "vqa", True),
}


@dataclass(frozen=True)
class EvalSection:
    """Validation during training, on the shards' explicit `val` split or on `fraction` of the training images
    (held out of training by a hash of image_id); none when neither exists."""

    fraction: float = field(default=0.0, metadata=_rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    every: int = field(default=0, metadata=_at_least(0))  # optimizer steps; 0: only at the end of the stage
    generate: int = field(default=32, metadata=_at_least(0))  # images greedily generated and scored; 0: loss only
    batch: int = field(default=8, metadata=_at_least(1))  # samples per chunk (loss) and images per generation batch
    # what export-best/ follows: loss (lower is better) or a generation figure (higher is better)
    best: str = field(default="loss", metadata=_rule(lambda v: v in VALIDATION_FIGURES,
                                                      f"one of {', '.join(VALIDATION_FIGURES)}"))


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
    eval: EvalSection = field(default_factory=EvalSection)

    @property
    def stage_dir(self) -> Path:
        return Path(self.run.dir) / self.stage.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    def to_dict(self) -> dict:
        """Plain data (enums by their value), as a recipe spells it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """Hash of everything that changes what a step computes (a resumed run must match it): of the eval
        section, only the fraction held out of training."""
        recipe = self.to_dict()
        keep = {k: v for k, v in recipe.items() if k not in ("checkpoint", "log", "eval")}
        keep["eval"] = {"fraction": recipe["eval"]["fraction"]}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe and apply `key.sub=value` overrides (values parsed as YAML), then validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    data = parse_yaml(path.read_text(), str(path)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        _set(data, key.strip(), parse_yaml(value, f"--set {item}"))
    return validate(build_dataclass(TrainConfig, data, str(path)), str(path))


def validate(cfg: TrainConfig, where: str) -> TrainConfig:
    """Every value checked against the rule beside its field, so what cannot work is refused before any
    setup (not after it, or never, as a hang or a negative learning rate)."""
    broken = next(itertools.chain(_broken_rules(cfg), _mismatches(cfg)), None)
    if broken is not None:
        raise ConfigError(f"{where}: {broken}")
    return cfg


def _broken_rules(section: Any, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _broken_rules(value, key + ".")
        elif value is not None and "rule" in f.metadata and not f.metadata["rule"].ok(value):
            yield f"{key} must be {f.metadata['rule'].wanted}, got {value!r}"


def _mismatches(cfg: TrainConfig) -> Iterator[str]:
    """Values that are valid alone but cannot work together."""
    best, figure = cfg.eval.best, VALIDATION_FIGURES[cfg.eval.best]
    if figure.generated and cfg.eval.generate == 0:
        yield f"eval.best = {best} is scored on generations, but eval.generate = 0 generates none"
    if figure.task is not None and figure.task not in cfg.stage.tasks:
        yield (f"eval.best = {best} is scored on [{figure.task}] generations, but stage.tasks = "
               f"{list(cfg.stage.tasks)}")


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
    for section, key in (("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")):
        if ds.get(section, {}).get(key) is False:
            raise ConfigError(f"DeepSpeed config sets {section}.{key} = false: a step with a non-finite gradient would "
                              "then update the weights instead of being skipped; remove the key")
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
    data: dict  # `data_record(cfg)`: what the stage trains on, recorded in its checkpoints
    holdout: Holdout | None  # the validation images (`validation_holdout(cfg)`); None: no validation
    grammar: Grammar  # `stage_grammar(cfg)`: the shard set's labels and sentences, recorded in the stage's exports


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
    return Recipe(cfg, model_cfg, deepspeed_config(ds_base, cfg, world_size, bf16), bf16, data_record(cfg),
                  validation_holdout(cfg), stage_grammar(cfg))


def check_inputs(cfg: TrainConfig) -> None:
    """Stage prerequisites that can be checked before starting ranks: data in the split, and a previous stage's
    export (stage.init_from) trained on the same label vocabulary as this stage's shards (VocabularyMismatch)."""
    manifest = read_manifest(Path(cfg.data.shards))
    if cfg.data.split not in manifest["splits"] or manifest["splits"][cfg.data.split]["samples"] == 0:
        raise ValueError(f"{cfg.data.shards}: no samples in split {cfg.data.split!r}")
    if cfg.stage.init_from:
        export = Path(cfg.stage.init_from)
        info_path = export / "export.json"  # with projector.safetensors, what litegpt.model.export (torch) writes
        if not (export / "projector.safetensors").is_file() or not info_path.is_file():
            raise ValueError(f"stage.init_from = {export}: no export there; train the previous stage first (its "
                             "export is written to <run.dir>/<stage>/export when it ends, and to "
                             "<run.dir>/<stage>/export-best whenever a validation improves eval.best)")
        try:
            info = json.loads(info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{info_path}: not valid JSON ({exc})") from None
        _recorded(info, info_path).vocabulary.require_same(
            _recorded(manifest, Path(cfg.data.shards) / MANIFEST).vocabulary, f"stage.init_from = {export}",
            f"the shard set {cfg.data.shards}")
    validation_holdout(cfg)


def stage_grammar(cfg: TrainConfig) -> Grammar:
    """The text the stage trains on: its shard set's label vocabulary and task template, as `litegpt prepare`
    recorded them in manifest.json (sets prepared before they were recorded: VinDr-CXR, the paper's text)."""
    return _recorded(read_manifest(Path(cfg.data.shards)), Path(cfg.data.shards) / MANIFEST)


def _recorded(record: dict, path: Path) -> Grammar:
    """The grammar a manifest.json or export.json records; one that cannot be used is named by its file."""
    try:
        return Grammar.from_record(record)
    except VocabularyError as exc:
        raise VocabularyError(f"{path}: {exc}") from None


def validation_holdout(cfg: TrainConfig) -> Holdout | None:
    """The stage's validation images (`litegpt.data.splits.choose_holdout`): None when the shards have no
    `val` split and eval.fraction is 0."""
    manifest = read_manifest(Path(cfg.data.shards))
    try:
        return choose_holdout(manifest["splits"], cfg.data.split, cfg.eval.fraction)
    except ValueError as exc:
        raise ValueError(f"{cfg.data.shards}: data.split = {cfg.data.split}, eval.fraction = {cfg.eval.fraction}: "
                         f"{exc}") from None


def data_record(cfg: TrainConfig) -> dict:
    """What the stage trains on, as its checkpoints record it so that a resume on other data is refused:
    `shards`, a digest of the split's shards (name, samples, sha256) from the manifest, changes whenever the
    shards are re-prepared with other contents; `preparation` (the manifest's parameters, e.g. the label
    policy) only explains such a change; `validation`, what is held out (`litegpt.data.splits.Holdout`), changes
    the training set with the fraction (which the config digest holds); `vocabulary` and `template`
    (`stage_grammar`), the labels and sentences of the text: records written before they were recorded mean
    VinDr-CXR's and the paper's (`Grammar.from_record`)."""
    manifest = read_manifest(Path(cfg.data.shards))
    shards = sorted([s["name"], s["samples"], s.get("sha256")] for s in manifest["shards"] if s["split"] == cfg.data.split)
    holdout = validation_holdout(cfg)
    return {"shards": hashlib.sha256(json.dumps(shards).encode()).hexdigest(), "split": cfg.data.split,
            "tasks": list(cfg.stage.tasks), "findings_only": cfg.stage.findings_only,
            "preparation": manifest.get("params", {}), "validation": None if holdout is None else holdout.record(),
            **_recorded(manifest, Path(cfg.data.shards) / MANIFEST).to_dict()}
