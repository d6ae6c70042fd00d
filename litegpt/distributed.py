"""Where this process sits in the job: the one place that reads launcher environments, and what the job
scheduler sees of it (preemption signals in, exit codes out).

`deepspeed`, `torchrun` and `srun` each describe the job differently; this module maps all of them to
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (what torch.distributed and DeepSpeed read),
and a plain `python train.py` becomes a world of one with its own rendezvous.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from enum import IntEnum


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed | torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous started right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master(env: dict[str, str]) -> str:
    """First host of the allocation (`scontrol show hostnames` expands ranges such as node[01-04])."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def detect(env: dict[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Read the launcher's variables (without changing anything)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed / torchrun, or already mapped
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        return DistEnv(int(env["RANK"]), local, int(env["WORLD_SIZE"]), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        job = int(env.get("SLURM_JOB_ID", "0"))
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))  # same on every task of the job
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       env.get("MASTER_ADDR") or _slurm_master(env), port, "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def export(dist: DistEnv) -> None:
    """Write the mapping into os.environ, where torch.distributed and DeepSpeed look for it."""
    os.environ.update({
        "RANK": str(dist.rank), "LOCAL_RANK": str(dist.local_rank), "WORLD_SIZE": str(dist.world_size),
        "MASTER_ADDR": dist.master_addr, "MASTER_PORT": str(dist.master_port),
    })


def setup_logging(rank: int | None = None) -> None:
    """Show litegpt's INFO records (the attention implementation chosen, the MiniGPT-v2 import) on stderr,
    once per entry point; on multi-rank runs only rank 0 speaks (others keep warnings and errors).
    `rank=None` reads it from the launcher's environment."""
    rank = detect().rank if rank is None else rank
    logger = logging.getLogger("litegpt")
    if any(getattr(h, "litegpt", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.litegpt = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class ExitCode(IntEnum):
    """How a stage ends, as train.py's exit status."""

    DONE = 0
    BAD_CONFIG = 2  # refused before the first step
    NONFINITE = 3  # train.max_nonfinite non-finite steps in a row
    PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, requeue me (the SLURM scripts do)


class Preemption:
    """After `listen()`, SIGTERM / SIGUSR1 (SLURM's warning before the time limit or preemption) set
    `requested`; the trainer checkpoints at the end of the optimizer step and exits with PREEMPTED."""

    def __init__(self) -> None:
        self.requested = False

    def listen(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
