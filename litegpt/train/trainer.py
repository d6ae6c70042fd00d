"""The training loop of one stage: micro-batch after micro-batch until the last optimizer step.

`Trainer.fit` is the loop, `Trainer.train_step` one micro-batch (forward, backward, the engine's step; all
ranks agree whether it was finite and whether to stop), `Trainer.end_step` the close of an optimizer step,
`TrainState` where the stage stands (the client state of every checkpoint). An optimizer step with a
non-finite micro-batch on any rank is skipped whole: the trainable weights, the optimizer state (AdamW's
moments and step count) and the learning-rate schedule stay bit for bit as they were; the schedule does not
advance, so the next step applies the rate the skipped one would have. The loss, the finite flags and the
stop request stay on the device until the step ends, where they are read in one transfer, so no micro-batch
waits for the device (token counts are read at the monitor's reports). The engine is DeepSpeed's, or
anything with the members used here: call, `backward`, `step`, `skipped_steps`, `get_global_grad_norm`,
`lr_scheduler`, `device`, `module`, and what the `Checkpointer` calls. `litegpt.train.launch` builds a
Trainer from a recipe.

With a `Validation` (train.py builds `litegpt.eval.validation.Validator` when the stage has a validation
split), the weights are validated every `eval.every` optimizer steps and after the last one, before that
step's checkpoint; whenever `eval.best` improves, rank 0 writes them to `<stage>/export-best/` (its
export.json records the step, the figure and its value). The best so far (`BestValidation`) is saved in
every checkpoint beside the `TrainState`, so a resumed run validates at the same steps with the same values
and keeps the same export-best.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator, Protocol, TextIO

import torch
import torch.distributed as dist

from litegpt.distributed import ExitCode, Preemption
from litegpt.grammar import Grammar
from litegpt.model.config import ConfigError
from litegpt.model.inputs import Batch
from litegpt.train.checkpoint import Checkpointer
from litegpt.train.config import VALIDATION_FIGURES, TrainConfig, TrainSection
from litegpt.train.monitor import Counters, MicroStep, Monitor, StepRecord

BEST_EXPORT = "export-best"  # <stage>/export-best: the weights of the step with the best eval.best


@dataclass
class TrainState:
    """Where a stage stands; its `state_dict` is the checkpoint's client state, so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed (by each rank)
    samples_seen: int = 0  # all ranks
    skipped_microbatches: int = 0  # non-finite on some rank: their optimizer step is skipped
    truncated_answers: int = 0  # this rank's
    dropped_samples: int = 0  # this rank's

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


@dataclass
class BestValidation:
    """eval.best's best value so far and the step of it (export-best/ holds that step's weights); a checkpoint's
    client state holds it under "best_validation"."""

    value: float | None = None
    step: int | None = None

    def improves(self, value: float | None, higher_is_better: bool) -> bool:
        """A finite value beats none so far and any worse one."""
        return value is not None and math.isfinite(value) and (
            self.value is None or (value > self.value if higher_is_better else value < self.value))


@dataclass(frozen=True)
class Schedule:
    """How many micro-batches make a step, an epoch and the stage."""

    grad_accum: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def plan(cls, stream_micro_batches: int, train: TrainSection) -> Schedule:
        """From the micro-batches the stream yields per rank and epoch (a partial step at the end is left out)."""
        steps_per_epoch = stream_micro_batches // train.grad_accum
        if steps_per_epoch == 0:
            raise ConfigError(f"{stream_micro_batches} micro-batches per epoch are fewer than train.grad_accum "
                              f"= {train.grad_accum}")
        total = steps_per_epoch * train.epochs
        return cls(train.grad_accum, steps_per_epoch, total if train.max_steps is None else min(total, train.max_steps))

    @property
    def trained_per_epoch(self) -> int:
        """Micro-batches per epoch the steps consume (each rank)."""
        return self.steps_per_epoch * self.grad_accum


class MicroBatches(Protocol):
    """What the trainer reads of `TrainStream`."""

    def batches(self, epoch: int, skip: int = 0, per_epoch: int | None = None) -> Iterator[tuple[int, Batch]]: ...


class Validation(Protocol):
    """What the trainer validates with (`litegpt.eval.validation.Validator`): figures by name (those of
    `VALIDATION_FIGURES` it can give), the same on every rank, from the module being trained, which it leaves
    as it found it (modes, buffers, RNG)."""

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]: ...


class Trainer:
    """One stage's training on started ranks: every rank runs the same loop in step."""

    def __init__(self, cfg: TrainConfig, engine, stream: MicroBatches, schedule: Schedule, checkpointer: Checkpointer,
                 monitor: Monitor, grammar: Grammar, state: TrainState | None = None,
                 preemption: Preemption | None = None, inject_nonfinite: Collection[int] = (),
                 validation: Validation | None = None, best: BestValidation | None = None):
        """`grammar`: the text the stream renders, recorded in every export (inference reads it back);
        `inject_nonfinite`: optimizer steps (from 1) whose micro-batches count as non-finite (fault injection);
        `best`: as a resumed checkpoint recorded it."""
        self.cfg, self.engine, self.stream, self.schedule, self.grammar = cfg, engine, stream, schedule, grammar
        self.checkpointer, self.monitor = checkpointer, monitor
        self.state = TrainState() if state is None else state
        self.preemption = Preemption() if preemption is None else preemption
        self.inject_nonfinite = frozenset(inject_nonfinite)
        self.validation, self.best = validation, BestValidation() if best is None else best
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.nonfinite_in_a_row = 0
        self.stop_requested = False  # some rank was asked to stop (preemption), as of the last step's end
        self._agreed: list[torch.Tensor] = []  # the current step's micro-batches, see `train_step`
        self._skipped_before = engine.skipped_steps

    def fit(self) -> ExitCode:
        """Train to the last step; stop early with a checkpoint when asked to, or without one when too many
        steps in a row were non-finite."""
        state, schedule = self.state, self.schedule
        batches = _timed(b for _, b in self.stream.batches(state.epoch, skip=state.batch_in_epoch,
                                                            per_epoch=schedule.trained_per_epoch))
        while state.step < schedule.total_steps:
            batch, data_seconds = next(batches)
            micro = self.train_step(batch)
            self.monitor.micro_batch(micro, data_seconds)
            if state.batch_in_epoch % schedule.grad_accum:
                continue
            self.end_step(micro.lr)
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
                self._say(f"train.py: {self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                          f"gradient norm (limit train.max_nonfinite); stopping. Lower optim.lr, check the data, or "
                          f"resume from the last good checkpoint in {self.checkpointer.directory}", sys.stderr)
                return ExitCode.NONFINITE
            if self.stop_requested:
                self.save()
                self._say(f"train.py: preemption signal: checkpoint written at step {state.step}; "
                          f"exit {ExitCode.PREEMPTED.value} to be requeued")
                return ExitCode.PREEMPTED
            every = self.cfg.eval.every
            due = state.step == schedule.total_steps or (every > 0 and state.step % every == 0)
            if self.validation is not None and due:
                self.validate()
            if state.step % self.cfg.checkpoint.save_every == 0 or state.step == schedule.total_steps:
                self.save()
        return ExitCode.DONE

    def train_step(self, batch: Batch) -> MicroStep:
        """Forward and backward of one micro-batch, then the engine's step (which updates the weights at the
        end of an accumulation). One all-reduce, of [non-finite, loss (0 when non-finite), asked to stop]:
        any rank non-finite, the loss sum, any rank asked to stop. Nothing is read back to the host here;
        `end_step` reads the step's rows at once.

        A non-finite micro-batch on any rank makes every rank backpropagate its loss times NaN (a factor of
        1 otherwise, formed on the device from the all-reduced flag): the accumulated gradient is then
        non-finite and DeepSpeed's overflow check skips the whole optimizer step (no AdamW update, no
        momentum or weight decay, no scheduler step; `engine.skipped_steps` counts it), while the
        accumulation stays in step. A zero gradient would not do: AdamW's momentum and decay move the weights."""
        state, engine = self.state, self.engine
        state.truncated_answers += batch.truncated
        state.dropped_samples += len(batch.dropped)
        tokens = batch.attention_mask.sum()  # on the host batch, read only when the monitor reports
        batch = batch.to(engine.device, non_blocking=True)  # pinned by the loader on a GPU
        loss = engine(batch).loss
        bad = ~torch.isfinite(loss.detach()) | (state.step + 1 in self.inject_nonfinite)
        agreed = torch.stack([bad.float(), torch.where(bad, 0.0, loss.detach().float()),
                              torch.full((), float(self.preemption.requested), device=loss.device)])
        dist.all_reduce(agreed)  # on the device: NCCL reduces only device tensors
        self._agreed.append(agreed)
        lr = engine.lr_scheduler.get_last_lr()[0]  # the rate this step applies
        engine.backward(loss * torch.where(agreed[0] > 0, math.nan, 1.0).to(loss.dtype))
        engine.step()
        state.batch_in_epoch += 1
        state.samples_seen += len(batch.keys) * self.world_size
        return MicroStep(agreed, lr, len(batch.keys), tokens, batch.input_ids.shape[1],
                         engine.module.image_tokens * len(batch.keys))

    def end_step(self, lr: float) -> StepRecord:
        """Close the optimizer step the last micro-batch completed: read its micro-batches' agreed rows and
        the gradient norm in one transfer; the epoch, the skip counts, the non-finite streak, the stop
        request and the record."""
        state = self.state
        state.step += 1
        epoch = state.epoch
        if state.batch_in_epoch == self.schedule.trained_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        rows, grad_norm = _to_host(torch.stack(self._agreed), self.engine.get_global_grad_norm())
        self._agreed = []
        finite = [loss_sum / self.world_size for bad, loss_sum, _ in rows if not bad]
        state.skipped_microbatches += len(rows) - len(finite)
        self.stop_requested = rows[-1][2] > 0
        overflowed, self._skipped_before = self.engine.skipped_steps > self._skipped_before, self.engine.skipped_steps
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if (not finite or overflowed) else 0
        counters = Counters(state.skipped_microbatches, state.truncated_answers, state.dropped_samples,
                            self.engine.skipped_steps)
        return self.monitor.step(state.step, epoch, sum(finite) / len(finite) if finite else math.nan, lr,
                                 grad_norm, counters)

    def validate(self) -> dict[str, float]:
        """Validate this step's weights (every rank calls it); export-best/ when eval.best improved. The seconds
        it took are logged with the figures and left out of the training throughput."""
        start = time.perf_counter()
        figures = self.validation(self.engine.module, self.state.step)
        name = self.cfg.eval.best
        if self.best.improves(figures.get(name), VALIDATION_FIGURES[name].higher_is_better):
            refused = self._export(BEST_EXPORT, {"best": {"figure": name, "value": figures[name]}})
            if refused is None:
                self.best = BestValidation(figures[name], self.state.step)
            else:  # non-finite weights: the previous export-best stays the best
                self._say(f"train.py: {refused}", sys.stderr)
        self.monitor.validation(self.state.step, figures, time.perf_counter() - start)
        return figures

    def save(self) -> None:
        """A checkpoint of this step (every rank calls it)."""
        self.checkpointer.save(self.engine, {**self.state.state_dict(), "config_digest": self.cfg.digest(),
                                             "best_validation": dataclasses.asdict(self.best)})

    def export(self) -> None:
        """The stage's export of its last step (adapter, projector, model config); rank 0 raises an ExportError."""
        refused = self._export("export")
        if refused is not None and self.rank == 0:
            raise refused
        stage_dir = self.cfg.stage_dir
        best = ("" if self.best.step is None else
                f" (best {self.cfg.eval.best}: step {self.best.step}, in {stage_dir / BEST_EXPORT})")
        self._say(f"stage {self.cfg.stage.name} done: export in {stage_dir / 'export'}{best}, TensorBoard: "
                  f"tensorboard --logdir {stage_dir / 'tensorboard'} --host 127.0.0.1")

    def _export(self, name: str, info: dict | None = None) -> Exception | None:
        """`<stage>/<name>/` of the current weights, written by rank 0 while the others wait; rank 0's
        ExportError (non-finite weights: nothing written), or None, on every rank."""
        from litegpt.model.export import ExportError, save_export

        refused = None
        if self.rank == 0:
            try:
                save_export(self.engine.module, self.cfg.stage_dir / name, {
                    "stage": self.cfg.stage.name, "step": self.state.step, "tasks": list(self.cfg.stage.tasks),
                    "task_token": self.cfg.stage.task_token, **self.grammar.to_dict(), **(info or {})})
            except ExportError as exc:  # returned after the barrier, so the other ranks are not left waiting
                refused = exc
        return _from_rank0(refused)

    def close(self) -> None:
        self.monitor.close()

    def _say(self, message: str, stream: TextIO | None = None) -> None:
        if self.rank == 0:
            print(message, file=stream or sys.stdout, flush=True)


def _from_rank0(error: Exception | None) -> Exception | None:
    """Rank 0's error (or None) on every rank; the call is the barrier."""
    if dist.get_world_size() == 1:
        return error
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _to_host(rows: torch.Tensor, grad_norm: torch.Tensor | float | None) -> tuple[list[list[float]], float | None]:
    """The step's rows and the gradient norm (a device tensor, a float, or None) in one device-to-host read."""
    if not isinstance(grad_norm, torch.Tensor):
        return rows.tolist(), None if grad_norm is None else float(grad_norm)
    flat = torch.cat([rows.flatten().double(), grad_norm.detach().reshape(1).double()]).tolist()
    width = rows.shape[1]
    return [flat[i:i + width] for i in range(0, len(flat) - 1, width)], flat[-1]


def _timed(batches: Iterable[Batch]) -> Iterator[tuple[Batch, float]]:
    """Each batch with the seconds the loop waited for it."""
    start = time.perf_counter()
    for batch in batches:
        yield batch, time.perf_counter() - start
        start = time.perf_counter()
