"""What a run shows while it trains: one record per optimizer step, written on rank 0 to the console
(a progress bar), TensorBoard and `<stage>/metrics.jsonl`, so the three always agree.

Throughput is counted in model FLOPs of LoRA training on a frozen base: per token, forward (2N) plus
activation gradients (2N) through the frozen weights, plus weight gradients (2N) only for trainable
ones, plus attention (12 x layers x sequence x width, forward and backward); the projector counts once
per image token. MFU divides by the device's peak dense bf16 rate (looked up, or `log.peak_tflops`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 peak TFLOP/s per device, by a name fragment (vendor datasheets).
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "V100": 125.0}


def device_peak_tflops(override: float | None) -> float | None:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


@dataclass(frozen=True)
class FlopModel:
    """Enough of the model's shape to count FLOPs."""

    llm_frozen: int  # frozen LLM parameters (base weights)
    llm_trainable: int  # trainable parameters inside the LLM (LoRA, ...)
    projector: int  # trainable parameters applied per image token
    layers: int
    width: int

    def step_flops(self, tokens: int | torch.Tensor, seq_len: int, image_tokens: int) -> float | torch.Tensor:
        per_token = 4 * self.llm_frozen + 6 * self.llm_trainable + 12 * self.layers * seq_len * self.width
        return tokens * per_token + 6 * self.projector * image_tokens


def flop_model_of(model) -> FlopModel:
    """Count the LLM's frozen and trainable parameters and read its shape from its config."""
    llm_frozen = sum(p.numel() for p in model.llm.parameters() if not p.requires_grad)
    llm_trainable = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    config = model.llm.config
    return FlopModel(llm_frozen, llm_trainable, sum(p.numel() for p in model.projector.parameters()),
                     config.num_hidden_layers, config.hidden_size)


@dataclass(frozen=True)
class MicroStep:
    """One micro-batch as the loop logs it: this rank's sizes, and what all ranks agreed, still on the device
    (the loop reads it when the optimizer step ends; no micro-batch waits for a device-to-host copy)."""

    agreed: torch.Tensor  # [any rank non-finite, loss summed over ranks (0 when non-finite), any rank asked to stop]
    lr: float  # the rate its gradient is applied with
    samples: int
    tokens: torch.Tensor  # non-padding tokens (0-dim, of the host batch): summed, read at a report
    seq_len: int
    image_tokens: int


@dataclass(frozen=True)
class Counters:
    """Running totals of what training left out or cut, since the stage began."""

    skipped_microbatches: int
    truncated_answers: int
    dropped_samples: int
    skipped_steps: int  # optimizer steps DeepSpeed skipped (non-finite loss, gradient overflow, injected fault)


@dataclass(frozen=True)
class Perf:
    """Throughput and memory over the steps since the previous report (all ranks)."""

    mean_loss: float
    samples_per_s: float
    tokens_per_s: float
    tflops_per_device: float
    data_share: float  # of the wall time spent waiting for batches
    mfu: float | None  # None when the device's peak is unknown
    peak_gib: float | None  # GPU memory allocated (on a GPU)
    peak_rss_gib: float | None  # the process's resident memory (on CPU)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step; `perf` every `log.every` steps."""

    step: int
    epoch: int  # the epoch the step's micro-batches came from
    loss: float  # mean over the step's finite micro-batches (all ranks); NaN when none was finite
    lr: float  # the rate the step applied
    grad_norm: float | None
    counters: Counters
    perf: Perf | None = None

    def to_json(self) -> str:
        """The metrics.jsonl line: flat, unset figures left out."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("counters", "perf")}
        row.update(dataclasses.asdict(self.counters))
        if self.perf is not None:
            row.update({k: v for k, v in dataclasses.asdict(self.perf).items() if v is not None})
        return json.dumps(row)

    def scalars(self) -> dict[str, float]:
        """TensorBoard tag -> value: the step's loss, rate and norm; counters, perf and memory when reported."""
        out = {"train/loss": self.loss, "train/lr": self.lr}
        if self.grad_norm is not None:
            out["train/grad_norm"] = self.grad_norm
        if self.perf is not None:
            perf = self.perf
            out.update({"perf/samples_per_s": perf.samples_per_s, "perf/tokens_per_s": perf.tokens_per_s,
                        "perf/tflops_per_device": perf.tflops_per_device, "perf/data_share": perf.data_share})
            out.update({f"counters/{k}": v for k, v in dataclasses.asdict(self.counters).items()})
            if perf.mfu is not None:
                out["perf/mfu"] = perf.mfu
            for name in ("peak_gib", "peak_rss_gib"):
                if getattr(perf, name) is not None:
                    out[f"mem/{name}"] = getattr(perf, name)
        return out

    def console(self) -> str:
        """The progress bar's postfix at a report."""
        perf = self.perf
        mfu = f" mfu {perf.mfu:.1%}" if perf.mfu is not None else ""
        return (f"loss {perf.mean_loss:.4f} lr {self.lr:.2e} {perf.samples_per_s:.1f} samples/s "
                f"{perf.tflops_per_device:.2f} TFLOP/s{mfu} data {perf.data_share:.0%}")


@dataclass
class _Window:
    steps: int = 0
    loss: float = 0.0
    samples: int = 0
    tokens: int | torch.Tensor = 0  # tensors from the micro-batches, read at the report
    flops: float | torch.Tensor = 0.0
    data_seconds: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class Monitor:
    """Builds the step records on every rank; rank 0 writes them to `<stage_dir>/tensorboard`,
    `<stage_dir>/metrics.jsonl` (appended: a resumed run's lines follow) and the console."""

    def __init__(self, stage_dir: Path, is_main: bool, every: int, total_steps: int, start_step: int,
                 flop_model: FlopModel, peak_tflops: float | None, world_size: int):
        self.is_main, self.every, self.flop_model = is_main, every, flop_model
        self.peak, self.world_size = peak_tflops, world_size
        self.window = _Window()
        self.writer = self.bar = self.jsonl = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(stage_dir) / "tensorboard"))
            self.jsonl = open(Path(stage_dir) / "metrics.jsonl", "a")
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True)

    def micro_batch(self, micro: MicroStep, data_seconds: float) -> None:
        """Account one micro-batch of this rank (the same sizes are assumed on every rank); its token count
        is added as a tensor and read only when a report is due."""
        w = self.window
        w.samples += micro.samples * self.world_size
        w.tokens += micro.tokens * self.world_size
        w.flops += self.flop_model.step_flops(micro.tokens, micro.seq_len, micro.image_tokens) * self.world_size
        w.data_seconds += data_seconds

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float | None,
             counters: Counters) -> StepRecord:
        """The record of an optimizer step that just ended, written out on rank 0."""
        w = self.window
        w.steps += 1
        w.loss += loss
        perf = None
        if step % self.every == 0:
            perf = self._perf()
            self.window = _Window()
        record = StepRecord(step, epoch, loss, lr, grad_norm, counters, perf)
        if self.is_main:
            self._write(record)
        return record

    def validation(self, step: int, figures: dict[str, float], seconds: float) -> None:
        """A validation's figures, on rank 0 under `val/` in TensorBoard, as one metrics.jsonl line (with the
        step) and one console line, with `val/seconds`, the time it took; the throughput window leaves that
        time out."""
        self.window.start += seconds
        if not self.is_main:
            return
        row = {**{f"val/{name}": value for name, value in figures.items()}, "val/seconds": seconds}
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        for tag, value in row.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        shown = ", ".join(f"{name} {value:.4f}" for name, value in figures.items())
        self.bar.write(f"validation at step {step}: {shown} ({seconds:.1f} s)")

    def _perf(self) -> Perf:
        w = self.window
        seconds = max(time.perf_counter() - w.start, 1e-9)
        tokens, flops = torch.stack([torch.as_tensor(w.tokens, dtype=torch.float64),
                                     torch.as_tensor(w.flops, dtype=torch.float64)]).tolist()  # one read
        tflops = flops / seconds / 1e12 / self.world_size  # per device
        if torch.cuda.is_available():
            peak_gib, peak_rss_gib = torch.cuda.max_memory_allocated() / 2**30, None
        else:
            import resource

            peak_gib, peak_rss_gib = None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return Perf(w.loss / w.steps, w.samples / seconds, tokens / seconds, tflops, w.data_seconds / seconds,
                    tflops / self.peak if self.peak else None, peak_gib, peak_rss_gib)

    def _write(self, record: StepRecord) -> None:
        self.jsonl.write(record.to_json() + "\n")
        self.jsonl.flush()
        for tag, value in record.scalars().items():
            self.writer.add_scalar(tag, value, record.step)
        self.bar.update(1)
        if record.perf is not None:
            self.writer.flush()
            self.bar.set_postfix_str(record.console())

    def close(self) -> None:
        if self.is_main:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
