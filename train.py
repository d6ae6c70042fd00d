"""Train one LiteGPT stage with DeepSpeed ZeRO-2.

    deepspeed train.py --deepspeed ds_configs/zero2.json --config configs/stage1.yaml [--resume auto]
    torchrun --nproc-per-node 4 train.py ...      srun python train.py ...      python train.py ...

Reads like the loop it is: set up (config, ranks, features, model, engine, resume), then for every
micro-batch forward, backward, step, log, checkpoint. Exit code 75 means "preempted, checkpoint written:
requeue me" (the SLURM scripts do).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

PREEMPTED = 75  # EX_TEMPFAIL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="stage recipe, e.g. configs/stage1.yaml")
    parser.add_argument("--deepspeed", required=True, type=Path, help="DeepSpeed config JSON (ds_configs/zero2.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.micro_batch=2 (repeatable)")
    parser.add_argument("--resume", choices=("auto", "none"), default="auto",
                        help="auto: continue from the stage's latest checkpoint if there is one (default)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit or preemption) set a flag; the loop
    checkpoints at the next optimizer step and exits with PREEMPTED."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preemption = Preemption()

    # ---- configuration, validated before anything heavy
    import torch

    from litegpt import distributed
    from litegpt.model.config import ConfigError, load_model_config
    from litegpt.train.config import deepspeed_config, load_train_config

    on_gpu = torch.cuda.is_available()
    dist_env = distributed.detect(local_rank_arg=args.local_rank)
    try:
        cfg = load_train_config(args.config, args.set)
        model_cfg = load_model_config(cfg.model)
        ds_base = json.loads(args.deepspeed.read_text())
        check_inputs(cfg)
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu
                                                  and torch.cuda.is_bf16_supported())
        ds_config = deepspeed_config(ds_base, cfg, dist_env.world_size, bf16)
    except (ConfigError, OSError, json.JSONDecodeError, ValueError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 2

    # ---- ranks
    distributed.export(dist_env)
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    import deepspeed
    import torch.distributed as dist

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoids a 45 s C++ build on CPU
    else:
        torch.cuda.set_device(dist_env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # ---- data: the feature cache (built once, by all ranks) and the stream
    from litegpt.features import visual_decoder
    from litegpt.model.inputs import Visual
    from litegpt.train.stream import StreamSpec, TrainStream, eligible_counts

    shards = Path(cfg.data.shards)
    if cfg.data.features is Visual.CACHE:
        source_dir = ensure_feature_cache(shards, model_cfg, cfg.model, rank, world, "cuda" if on_gpu else "cpu")
    else:
        source_dir = shards
    counts = eligible_counts(shards, cfg.data.split, cfg.stage.findings_only)
    spec = StreamSpec(
        urls=tuple(str(source_dir / name) for name, n in counts.items() if n > 0),
        n_samples=sum(counts.values()) * len(cfg.stage.tasks), tasks=cfg.stage.tasks,
        task_token=cfg.stage.task_token, findings_only=cfg.stage.findings_only,
        source=cfg.data.features, micro_batch=cfg.train.micro_batch, seed=cfg.run.seed,
        shuffle_buffer=cfg.data.shuffle_buffer, length_group=cfg.data.length_group, num_workers=cfg.data.num_workers)

    # ---- model, optimizer, engine
    from litegpt.model.export import load_export, save_export
    from litegpt.model.model import build_model, parameter_counts
    from litegpt.train.optim import build_optimizer

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(model_cfg, with_encoders=cfg.data.features is Visual.LIVE)
    if cfg.stage.init_from:
        load_export(model, Path(cfg.stage.init_from))
    visual = visual_decoder(spec.source, None if model.vision is None else model.vision.preprocess)
    stream = TrainStream(spec, rank, world, visual, model.inputs.train_batch)
    steps_per_epoch = stream.batches_per_epoch // cfg.train.grad_accum
    if steps_per_epoch == 0:
        print(f"train.py: {stream.batches_per_epoch} micro-batches per epoch are fewer than train.grad_accum "
              f"= {cfg.train.grad_accum}", file=sys.stderr)
        return 2
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    torch.manual_seed(cfg.run.seed + 1000 * rank)  # LoRA dropout differs across ranks, reproducibly

    # ---- resume
    from litegpt.train.checkpoint import Checkpointer, ResumeError

    stage_dir = cfg.stage_dir
    checkpointer = Checkpointer(stage_dir / "checkpoints", cfg.checkpoint.keep_last, rank, world)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "skipped_microbatches": 0,
             "truncated_answers": 0, "dropped_samples": 0}
    if args.resume == "auto":
        try:
            restored = checkpointer.load(engine, cfg.digest())
        except ResumeError as exc:
            print(f"train.py: {exc}", file=sys.stderr)
            return 2
        if restored is not None:
            state.update({k: restored[k] for k in state})
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (stage_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trainable, frozen = parameter_counts(model)
        print(f"stage {cfg.stage.name}: {world} rank(s), {stream.batches_per_epoch} micro-batches of "
              f"{cfg.train.micro_batch} per rank per epoch, {total_steps} steps, trainable {trainable:,} / frozen "
              f"{frozen:,} parameters, {'bf16' if bf16 else 'fp32'}, resuming at step {state['step']}", flush=True)

    # ---- monitoring
    from litegpt.train.monitor import Monitor, device_peak_tflops, flop_model_of

    monitor = Monitor(stage_dir / "tensorboard", rank == 0, cfg.log.every, total_steps, state["step"],
                      flop_model_of(model), device_peak_tflops(cfg.log.peak_tflops), world)
    metrics_log = open(stage_dir / "metrics.jsonl", "a") if rank == 0 else None
    inject = {int(s) for s in os.environ.get("LITEGPT_INJECT_NONFINITE", "").split(",") if s}  # fault injection

    def save() -> None:
        checkpointer.save(engine, {**state, "config_digest": cfg.digest()})

    # ---- the loop
    batches_per_epoch = steps_per_epoch * cfg.train.grad_accum
    nonfinite_in_a_row, micro_losses = 0, []
    skipped_before = engine.skipped_steps
    batches = stream.batches(state["epoch"], skip=state["batch_in_epoch"], per_epoch=batches_per_epoch)
    fetched = time.perf_counter()
    for _, batch in batches if state["step"] < total_steps else ():
        state["truncated_answers"] += batch.truncated
        state["dropped_samples"] += len(batch.dropped)
        batch = batch.to(engine.device)
        data_seconds = time.perf_counter() - fetched
        loss = engine(batch).loss
        # One all-reduce per micro-batch: [any rank non-finite, loss sum, any rank asked to stop]
        bad = not torch.isfinite(loss).item() or state["step"] + 1 in inject
        shared = torch.tensor([float(bad), 0.0 if bad else loss.item(), float(preemption.requested)],
                              device=engine.device)  # NCCL reduces only device tensors
        dist.all_reduce(shared)
        bad, stop_requested = shared[0].item() > 0, shared[2].item() > 0
        if bad:  # every rank skips together: a zero gradient keeps DeepSpeed's accumulation in step
            state["skipped_microbatches"] += 1
            loss = sum((p * 0).sum() for p in engine.module.parameters() if p.requires_grad)
        lr = scheduler.get_last_lr()[0]  # the rate this step applies
        engine.backward(loss)
        engine.step()
        micro_losses.append(math.nan if bad else shared[1].item() / world)
        monitor.micro_batch(len(batch.keys), int(batch.attention_mask.sum()), batch.input_ids.shape[1],
                            model.image_tokens * len(batch.keys), data_seconds)
        state["batch_in_epoch"] += 1
        state["samples_seen"] += len(batch.keys) * world
        fetched = time.perf_counter()
        if state["batch_in_epoch"] % cfg.train.grad_accum:
            continue

        # ---- an optimizer step ended
        state["step"] += 1
        epoch = state["epoch"]
        if state["batch_in_epoch"] == batches_per_epoch:
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
        finite = [v for v in micro_losses if not math.isnan(v)]
        step_loss = sum(finite) / len(finite) if finite else math.nan
        overflowed, skipped_before = engine.skipped_steps > skipped_before, engine.skipped_steps
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if (not finite or overflowed) else 0
        micro_losses = []
        grad_norm = engine.get_global_grad_norm()
        counters = {k: state[k] for k in ("skipped_microbatches", "truncated_answers", "dropped_samples")}
        counters["skipped_steps"] = engine.skipped_steps
        monitor.step(state["step"], step_loss, lr, None if grad_norm is None else float(grad_norm), counters)
        if metrics_log:
            metrics_log.write(json.dumps({"step": state["step"], "epoch": epoch, "loss": step_loss,
                                          "lr": lr, **counters}) + "\n")
            metrics_log.flush()
        if nonfinite_in_a_row >= cfg.train.max_nonfinite:
            if rank == 0:
                print(f"train.py: {nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                      f"norm (limit train.max_nonfinite); stopping. Lower optim.lr, check the data, or resume "
                      f"from the last good checkpoint in {checkpointer.directory}", file=sys.stderr)
            return 3
        if stop_requested:
            save()
            if rank == 0:
                print(f"train.py: preemption signal: checkpoint written at step {state['step']}; "
                      f"exit {PREEMPTED} to be requeued", flush=True)
            return PREEMPTED
        if state["step"] % cfg.checkpoint.save_every == 0 or state["step"] == total_steps:
            save()
        if state["step"] >= total_steps:
            break

    # ---- the stage's export
    if rank == 0:
        save_export(engine.module, stage_dir / "export", {"stage": cfg.stage.name, "step": state["step"],
                                                          "tasks": list(cfg.stage.tasks),
                                                          "task_token": cfg.stage.task_token})
        print(f"stage {cfg.stage.name} done: export in {stage_dir / 'export'}, TensorBoard: "
              f"tensorboard --logdir {stage_dir / 'tensorboard'} --host 127.0.0.1", flush=True)
    dist.barrier()
    monitor.close()
    return 0


def check_inputs(cfg) -> None:
    """Stage prerequisites that can be checked before starting ranks."""
    from litegpt.data.shards import read_manifest

    manifest = read_manifest(Path(cfg.data.shards))
    if cfg.data.split not in manifest["splits"] or manifest["splits"][cfg.data.split]["samples"] == 0:
        raise ValueError(f"{cfg.data.shards}: no samples in split {cfg.data.split!r}")
    if cfg.stage.init_from and not (Path(cfg.stage.init_from) / "projector.safetensors").is_file():
        raise ValueError(f"stage.init_from = {cfg.stage.init_from}: no export there; train the previous stage "
                         "first (its export is written to <run.dir>/<stage>/export when it ends)")


def ensure_feature_cache(shards: Path, model_cfg, model_path, rank: int, world: int, device: str) -> Path:
    """The cache for this model's encoders; when missing, every rank encodes a disjoint set of shards."""
    import torch.distributed as dist

    from litegpt.data.shards import read_manifest
    from litegpt.features import FeatureCacheError, encode_shards, finalize, open_cache

    try:
        return open_cache(shards, model_cfg.vision, model_path).directory
    except FeatureCacheError as exc:
        if rank == 0:
            print(f"building the feature cache ({exc.args[0].split('.')[0]})", flush=True)
    names = [s["name"] for s in read_manifest(shards)["shards"]]
    encode_shards(shards, model_cfg.vision, names[rank::world], device=device, progress=rank == 0)
    dist.barrier()
    if rank == 0:
        finalize(shards, model_cfg.vision)
    dist.barrier()
    return open_cache(shards, model_cfg.vision, model_path).directory


if __name__ == "__main__":
    sys.exit(main())
