"""DeepSpeed checkpoints that a killed run resumes from exactly, and only with what it was trained with.

`<stage>/checkpoints/<tag>/` holds DeepSpeed's files (frozen weights excluded; with our client state: step,
epoch, position in the epoch, config digest), `run.json` (world size, config digest and the data record:
read before anything is built, so that a resume that cannot be exact is refused up front) and one RNG file
per rank (LoRA dropout must draw the same numbers after a restart). Our own files are JSON, so resuming
unpickles nothing of ours; DeepSpeed's files are pickles that DeepSpeed itself loads. `latest` names the
newest complete tag: it is replaced atomically only after every rank has finished writing, so a kill
mid-save leaves the previous one.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from litegpt.files import write_bytes_atomic, write_json_atomic
from litegpt.grammar import Grammar

LATEST = "latest"
RUN_RECORD = "run.json"


class ResumeError(RuntimeError):
    pass


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank:05d}.json"


def _rng_state() -> dict:
    """This process's RNG states as plain JSON data (exact: integers, base64 bytes, floats by repr)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
            "python": [version, list(internal), gauss],
            "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])


def latest_tag(directory: Path) -> str | None:
    path = Path(directory) / LATEST
    return path.read_text().strip() if path.is_file() else None


def check_resume(directory: Path, config_digest: str, world_size: int, data: dict) -> str | None:
    """The newest complete tag in `directory` if this run can continue it exactly, None if there is none;
    a ResumeError naming what differs, and the way out, if it cannot."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    tag_dir = Path(directory) / tag
    path = tag_dir / RUN_RECORD
    if not path.is_file():
        raise ResumeError(f"{tag_dir} has no {RUN_RECORD}: an earlier litegpt wrote it, which recorded neither the "
                          "data it trained on nor RNG states readable without unpickling; finish the stage with that "
                          "version, or start over (a new run.dir, or --resume none)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResumeError(f"{path}: not valid JSON ({exc}); use a new run.dir, or --resume none to start over") from None
    if record["world_size"] != world_size:
        raise ResumeError(
            f"{tag_dir} was written by {record['world_size']} ranks, this run has {world_size}: an exact resume "
            "needs the same world size. To continue with the weights only, start a new stage from its export "
            f"(--set stage.init_from=<export dir>) or run with {record['world_size']} ranks.")
    differences = _data_differences(record["data"], data)
    if differences:
        raise ResumeError(f"{tag_dir} was trained on other data ({'; '.join(differences)}): use a new run.dir, or "
                          "--resume none to start over, or restore the data it was trained on to continue it")
    if record["config_digest"] != config_digest:
        raise ResumeError(f"{tag_dir} was written with a different recipe (digest {record['config_digest']} vs "
                          f"{config_digest}); use a new run.dir, or --resume none to start over")
    return tag


def _data_differences(before: dict, now: dict) -> list[str]:
    """What changed between two `litegpt.train.config.data_record`s, in words."""
    out = [f"{key} was {before.get(key)!r}, now {now.get(key)!r}"
           for key in ("split", "tasks", "findings_only", "validation") if before.get(key) != now.get(key)]
    was, is_ = Grammar.from_record(before), Grammar.from_record(now)  # records without them: VinDr-CXR, the paper's
    if was.vocabulary != is_.vocabulary:
        out.append(f"the label vocabulary was {was.vocabulary.describe()}, now {is_.vocabulary.describe()}")
    if was.template != is_.template:
        fields = [k for k, v in is_.template.to_dict().items() if was.template.to_dict()[k] != v]
        out.append(f"the task template's {', '.join(fields)} differ")
    if before["shards"] != now["shards"]:
        old = before["preparation"]
        changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in now["preparation"].items()
                   if old.get(key) != value and key not in ("vocabulary", "template")]  # named above
        out.append(f"the shards of split {now['split']!r} differ: "
                   + (f"re-prepared with {', '.join(changed)}" if changed else "re-prepared or altered"))
    return out


class Checkpointer:
    """Saves and restores one rank's share of a stage's checkpoints; `data` is the stage's data record."""

    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int, data: dict):
        self.directory = Path(directory)
        self.keep_last, self.rank, self.world_size, self.data = keep_last, rank, world_size, data

    def save(self, engine, client_state: dict) -> str:
        """Called by every rank at the same step."""
        tag = f"step{client_state['step']:08d}"
        tag_dir = self.directory / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_rng_file(tag_dir, self.rank), _rng_state())
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        dist.barrier()
        if self.rank == 0:
            write_json_atomic(tag_dir / RUN_RECORD, {"step": client_state["step"], "world_size": self.world_size,
                                                     "config_digest": client_state["config_digest"], "data": self.data})
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
        tag = check_resume(self.directory, config_digest, self.world_size, self.data)
        if tag is None:
            return None
        tag_dir = self.directory / tag
        rng_file = _rng_file(tag_dir, self.rank)
        if not rng_file.is_file():
            raise ResumeError(f"{tag_dir}: no {rng_file.name}; the checkpoint is incomplete")
        _, state = engine.load_checkpoint(str(self.directory), tag=tag, load_module_strict=False)
        if state is None:
            raise ResumeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        _set_rng_state(json.loads(rng_file.read_text()))
        return state
