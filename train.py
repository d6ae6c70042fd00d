"""Train one LiteGPT stage with DeepSpeed ZeRO-2.

    deepspeed train.py --deepspeed ds_configs/zero2.json --config configs/stage1.yaml [--resume auto]
    torchrun --nproc-per-node 4 train.py ...      srun python train.py ...      python train.py ...

The recipe is validated before ranks start and before torch, DeepSpeed or any model code is loaded; then the
stage is built (litegpt.train.launch), with its validator (litegpt.eval.validation) when the recipe holds
out a validation split, and trained (litegpt.train.trainer.Trainer.fit). Exit codes: 0 done,
2 bad configuration, 3 too many non-finite steps in a row, 75 "preempted, checkpoint written: requeue me"
(the SLURM scripts do).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="stage recipe, e.g. configs/stage1.yaml")
    parser.add_argument("--deepspeed", required=True, type=Path, help="DeepSpeed config JSON (ds_configs/zero2.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.micro_batch=2 (repeatable)")
    parser.add_argument("--resume", choices=("auto", "none"), default="auto",
                        help="auto: continue from the stage's latest checkpoint if there is one (default)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # fault injection for the tests: these optimizer steps (from 1) count as non-finite, e.g. 2,3
    parser.add_argument("--inject-nonfinite", type=lambda s: frozenset(int(x) for x in s.split(",") if x),
                        default=frozenset(), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from litegpt import distributed
    from litegpt.distributed import ExitCode, Preemption
    from litegpt.model.config import ConfigError
    from litegpt.train.config import load_recipe

    preemption = Preemption().listen()
    dist_env = distributed.detect(local_rank_arg=args.local_rank)
    try:
        recipe = load_recipe(args.config, args.set, args.deepspeed, dist_env.world_size)
    except (ConfigError, OSError, json.JSONDecodeError, ValueError) as exc:
        return refuse(exc)

    from litegpt.data.shards import ShardError
    from litegpt.features import FeatureCacheError
    from litegpt.model.export import ExportError
    from litegpt.train.checkpoint import ResumeError, check_resume
    from litegpt.train.launch import build_trainer, start_ranks

    try:  # before the cache, the model or the ranks are built: a checkpoint that cannot continue is refused now
        if args.resume == "auto":
            check_resume(recipe.cfg.checkpoint_dir, recipe.cfg.digest(), dist_env.world_size, recipe.data)
    except (ResumeError, OSError) as exc:
        return refuse(exc)

    rank, world = start_ranks(dist_env)
    distributed.setup_logging(rank)
    try:
        trainer = build_trainer(recipe, rank, world, resume=args.resume == "auto", preemption=preemption,
                                inject_nonfinite=args.inject_nonfinite, validation=build_validator(recipe, rank, world))
    except (ConfigError, ResumeError, ShardError, FeatureCacheError) as exc:
        return refuse(exc)
    code = trainer.fit()
    try:
        if code is ExitCode.DONE:
            trainer.export()
    except ExportError as exc:  # non-finite weights: the previous export is kept
        print(f"train.py: {exc}", file=sys.stderr)
        code = ExitCode.NONFINITE
    trainer.close()
    return code


def build_validator(recipe, rank: int, world: int):
    """The stage's `Validator`, or None when it has no validation split (litegpt.train.config.validation_holdout)."""
    from litegpt.eval.validation import ValidationPlan, Validator

    cfg, holdout = recipe.cfg, recipe.holdout
    if holdout is None:
        return None
    plan = ValidationPlan(Path(cfg.data.shards), cfg.data.features, cfg.model, holdout, cfg.stage.tasks,
                          cfg.stage.task_token, cfg.stage.findings_only, cfg.eval.batch, cfg.eval.generate,
                          cfg.stage_dir)
    validator = Validator(plan, recipe.model_cfg, rank, world)
    if rank == 0:
        held = (f"split {holdout.split!r}" if holdout.fraction is None else
                f"{holdout.fraction:.0%} of split {holdout.split!r} by image_id hash")
        when = f"every {cfg.eval.every} steps and at the end" if cfg.eval.every else "at the end of the stage"
        print(f"validation on {len(validator.images)} images ({held}): the loss on {validator.samples} samples, "
              f"{min(cfg.eval.generate, len(validator.images))} images generated, {when}; export-best follows "
              f"{cfg.eval.best}", flush=True)
    return validator


def refuse(exc: Exception) -> int:
    from litegpt.distributed import ExitCode

    print(f"train.py: {exc}", file=sys.stderr)
    return ExitCode.BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
