"""DeepSpeed checkpoints that a killed run resumes from exactly.

`<stage>/checkpoints/<tag>/` holds DeepSpeed's files (frozen weights excluded), our client state
(step, epoch, position in the epoch, config digest, world size) and one RNG file per rank (LoRA dropout
must draw the same numbers after a restart). `latest` names the newest complete tag: it is replaced
atomically only after every rank has finished writing, so a kill mid-save leaves the previous one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from litegpt.files import write_bytes_atomic

LATEST = "latest"


class ResumeError(RuntimeError):
    pass


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int):
        self.directory = Path(directory)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size

    def latest_tag(self) -> str | None:
        path = self.directory / LATEST
        return path.read_text().strip() if path.is_file() else None

    def save(self, engine, client_state: dict) -> str:
        """Called by every rank at the same step."""
        tag = f"step{client_state['step']:08d}"
        tag_dir = self.directory / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tag_dir / f"rng_rank{self.rank:05d}.pt")
        state = {**client_state, "world_size": self.world_size}
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=state, save_latest=False,
                               exclude_frozen_parameters=True)
        dist.barrier()
        if self.rank == 0:
            write_bytes_atomic(self.directory / LATEST, tag.encode())
            self._prune(keep=tag)
        dist.barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir())
        for old in tags[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(self.directory / old, ignore_errors=True)

    def load(self, engine, config_digest: str) -> dict | None:
        """Restore the newest complete checkpoint into `engine`; None when there is none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.directory / tag
        client = _peek_client_state(tag_dir)
        if client.get("world_size") != self.world_size:
            raise ResumeError(
                f"{tag_dir} was written by {client.get('world_size')} ranks, this run has {self.world_size}: "
                "an exact resume needs the same world size. To continue with the weights only, start a new "
                f"stage from its export (--set stage.init_from=<export dir>) or run with {client.get('world_size')} ranks.")
        if client.get("config_digest") != config_digest:
            raise ResumeError(f"{tag_dir} was written with a different recipe (digest {client.get('config_digest')} vs "
                              f"{config_digest}); use a new run.dir, or --resume none to start over")
        _, state = engine.load_checkpoint(str(self.directory), tag=tag, load_module_strict=False)
        if state is None:
            raise ResumeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        _set_rng_state(torch.load(tag_dir / f"rng_rank{self.rank:05d}.pt", weights_only=False))
        return state


def _peek_client_state(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ResumeError(f"{tag_dir}: no model states file; the checkpoint is incomplete")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: state.get(k) for k in ("world_size", "config_digest", "step")}
