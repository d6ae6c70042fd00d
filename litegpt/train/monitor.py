"""What a run shows while it trains: TensorBoard scalars on rank 0 and a console progress bar.

Throughput is counted in model FLOPs of LoRA training on a frozen base: per token, forward (2N) plus
activation gradients (2N) through the frozen weights, plus weight gradients (2N) only for trainable
ones, plus attention (12 x layers x sequence x width, forward and backward); the projector counts once
per image token. MFU divides by the device's peak dense bf16 rate (looked up, or `log.peak_tflops`).
"""

from __future__ import annotations

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

    def step_flops(self, tokens: int, seq_len: int, image_tokens: int) -> float:
        per_token = 4 * self.llm_frozen + 6 * self.llm_trainable + 12 * self.layers * seq_len * self.width
        return tokens * per_token + 6 * self.projector * image_tokens


def flop_model_of(model) -> FlopModel:
    """Count the LLM's frozen and trainable parameters and read its shape from its config."""
    llm_frozen = sum(p.numel() for p in model.llm.parameters() if not p.requires_grad)
    llm_trainable = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    config = model.llm.config
    return FlopModel(llm_frozen, llm_trainable, sum(p.numel() for p in model.projector.parameters()),
                     config.num_hidden_layers, config.hidden_size)


@dataclass
class _Window:
    steps: int = 0
    loss: float = 0.0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    data_seconds: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class Monitor:
    def __init__(self, log_dir: Path, is_main: bool, every: int, total_steps: int, start_step: int,
                 flop_model: FlopModel, peak_tflops: float | None, world_size: int):
        self.is_main, self.every, self.flop_model = is_main, every, flop_model
        self.peak, self.world_size = peak_tflops, world_size
        self.window = _Window()
        self.writer = None
        self.bar = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True)

    def micro_batch(self, samples: int, tokens: int, seq_len: int, image_tokens: int, data_seconds: float) -> None:
        """Account one micro-batch of this rank (tokens: non-padding tokens)."""
        w = self.window
        w.samples += samples * self.world_size
        w.tokens += tokens * self.world_size
        w.flops += self.flop_model.step_flops(tokens, seq_len, image_tokens) * self.world_size
        w.data_seconds += data_seconds

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, counters: dict[str, int]) -> None:
        """Called after each optimizer step with the mean loss over its micro-batches (all ranks)."""
        w = self.window
        w.steps += 1
        w.loss += loss
        if not self.is_main:
            if step % self.every == 0:
                self.window = _Window()
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        if grad_norm is not None:
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
        self.bar.update(1)
        if step % self.every:
            return
        seconds = max(time.perf_counter() - w.start, 1e-9)
        tflops = w.flops / seconds / 1e12 / self.world_size  # per device
        scalars = {
            "perf/samples_per_s": w.samples / seconds,
            "perf/tokens_per_s": w.tokens / seconds,
            "perf/tflops_per_device": tflops,
            "perf/data_share": w.data_seconds / seconds,
            **{f"counters/{k}": v for k, v in counters.items()},
        }
        if self.peak:
            scalars["perf/mfu"] = tflops / self.peak
        if torch.cuda.is_available():
            scalars["mem/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            scalars["mem/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        mfu = f" mfu {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
        self.bar.set_postfix_str(f"loss {w.loss / w.steps:.4f} lr {lr:.2e} {scalars['perf/samples_per_s']:.1f} "
                                 f"samples/s {tflops:.2f} TFLOP/s{mfu} data {scalars['perf/data_share']:.0%}")
        self.window = _Window()

    def close(self) -> None:
        if self.is_main:
            self.bar.close()
            self.writer.close()
