"""From a validated recipe (`litegpt.train.config.load_recipe`) to a ready `Trainer`, in the order a stage
needs: the ranks, the feature cache, the stream, the model and its DeepSpeed engine, the resumed state, the
monitor. DeepSpeed is imported once `start_ranks` has chosen its accelerator (it reads DS_ACCELERATOR on import).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

import torch
import torch.distributed as dist
import yaml

from litegpt import distributed
from litegpt.data.integrity import verify_shard_set
from litegpt.data.shards import read_manifest
from litegpt.distributed import Preemption
from litegpt.model.config import ModelConfig, Visual
from litegpt.train.checkpoint import Checkpointer
from litegpt.train.config import Recipe
from litegpt.train.monitor import Monitor, device_peak_tflops, flop_model_of
from litegpt.train.optim import build_optimizer
from litegpt.train.trainer import BestValidation, Schedule, Trainer, TrainState, Validation


def start_ranks(dist_env: distributed.DistEnv) -> tuple[int, int]:
    """torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU ranks. Returns (rank, world size)."""
    distributed.export(dist_env)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    import deepspeed

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoids a 45 s C++ build on CPU
    else:
        torch.cuda.set_device(dist_env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


def ensure_feature_cache(shards: Path, model_cfg: ModelConfig, model_path: str, rank: int, world: int,
                         device: str) -> Path:
    """The cache for this model's encoders; when missing, every rank encodes a disjoint set of shards."""
    from litegpt.features import FeatureCacheError, encode_shards, finalize, open_cache

    try:
        return open_cache(shards, model_cfg.vision, model_path).directory
    except FeatureCacheError as exc:
        if rank == 0:
            print(f"building the feature cache: {exc}", flush=True)
    names = [s["name"] for s in read_manifest(shards)["shards"]]
    encode_shards(shards, model_cfg.vision, names[rank::world], device=device, progress=rank == 0)
    dist.barrier()
    if rank == 0:
        finalize(shards, model_cfg.vision)
    dist.barrier()
    return open_cache(shards, model_cfg.vision, model_path).directory


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Relative seeded noise on the trainable weights (the same on every rank): a run that changes with it is
    one whose result another CPU's rounding could change as well."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.mul_(1 + scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def build_trainer(recipe: Recipe, rank: int, world: int, *, resume: bool, preemption: Preemption | None = None,
                  inject_nonfinite: Collection[int] = (), validation: Validation | None = None) -> Trainer:
    """The stage's Trainer on started ranks, validating with `validation` (None: no validation); raises
    ConfigError or ResumeError for a stage that cannot run."""
    import deepspeed

    from litegpt.model.export import load_export
    from litegpt.model.model import build_model, parameter_counts
    from litegpt.train.stream import TrainStream

    cfg, model_cfg = recipe.cfg, recipe.model_cfg
    source_dir = Path(cfg.data.shards)
    if cfg.data.features is Visual.CACHE:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        source_dir = ensure_feature_cache(source_dir, model_cfg, cfg.model, rank, world, device)
    else:  # the cache verifies its image shards when opened; live encoders read them directly
        verify_shard_set(source_dir, cfg.data.split)
    stream = TrainStream.from_recipe(cfg, model_cfg, source_dir, rank, world)
    schedule = Schedule.plan(stream.micro_batches_per_epoch, cfg.train)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(model_cfg, with_encoders=cfg.data.features is Visual.LIVE)
    if cfg.stage.init_from:
        load_export(model, Path(cfg.stage.init_from))
    if cfg.run.perturb_init:
        perturb(model, cfg.run.perturb_init, cfg.run.perturb_seed)
    if not recipe.bf16:  # fp32 training computes in fp32, whatever dtype the weights ship in (the paper's: bf16)
        model.float()
    optimizer, scheduler = build_optimizer(model, cfg.optim, schedule.total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=recipe.deepspeed)
    torch.manual_seed(cfg.run.seed + 1000 * rank)  # LoRA dropout differs across ranks, reproducibly

    checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, rank, world, recipe.data)
    state, best = TrainState(), BestValidation()
    restored = checkpointer.load(engine, cfg.digest()) if resume else None
    if restored is not None:
        state.load_state_dict(restored)
        best = BestValidation(**restored.get("best_validation", {}))
    if rank == 0:
        cfg.stage_dir.mkdir(parents=True, exist_ok=True)
        (cfg.stage_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trainable, frozen = parameter_counts(model)
        print(f"stage {cfg.stage.name}: {world} rank(s), {stream.micro_batches_per_epoch} micro-batches of "
              f"{cfg.train.micro_batch} per rank per epoch, {schedule.total_steps} steps, trainable {trainable:,} / "
              f"frozen {frozen:,} parameters, {'bf16' if recipe.bf16 else 'fp32'}, resuming at step {state.step}",
              flush=True)
    monitor = Monitor(cfg.stage_dir, rank == 0, cfg.log.every, schedule.total_steps, state.step, flop_model_of(model),
                      device_peak_tflops(cfg.log.peak_tflops), world)
    return Trainer(cfg, engine, stream, schedule, checkpointer, monitor, recipe.grammar, state, preemption,
                   inject_nonfinite, validation, best)
