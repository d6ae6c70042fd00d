"""The Trainer's step logic in one process, without DeepSpeed: a stand-in engine (a tiny module, SGD, the
engine's accumulation rules) and in-memory micro-batches, checked against the same training written out
as a plain PyTorch loop. And what a stage takes from its shard set: the text its stream renders (the set's
label vocabulary and template), the data its checkpoints record, the export it may start from."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from litegpt.data.shards import MANIFEST, read_manifest, read_samples, shard_paths
from litegpt.distributed import ExitCode, Preemption, free_port
from litegpt.files import write_json_atomic
from litegpt.grammar import Grammar, TaskTemplate
from litegpt.labels import VINDR_CXR, Vocabulary, VocabularyError, VocabularyMismatch
from litegpt.model.config import ConfigError, Visual
from litegpt.model.inputs import IGNORE_INDEX, Batch
from litegpt.train.checkpoint import Checkpointer, ResumeError
from litegpt.train.config import (
    CheckpointSection,
    DataSection,
    LogSection,
    RunSection,
    StageSection,
    TrainConfig,
    TrainSection,
    check_inputs,
    data_record,
    stage_grammar,
)
from litegpt.train.monitor import FlopModel, Monitor
from litegpt.train.stream import TrainStream
from litegpt.train.trainer import Schedule, Trainer, TrainState

REPO = Path(__file__).resolve().parent.parent

VOCAB, WIDTH, LR = 13, 8, 0.5
SGD = {"lr": LR, "momentum": 0.9, "weight_decay": 0.01}  # like AdamW, a zero gradient would still move the weights
STREAM_LEN = 5  # micro-batches the stream yields per epoch; with grad_accum 2 the fifth is left out


def lr_factor(step: int) -> float:
    return 1.0 / (1.0 + step)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """torch.distributed over gloo with one rank: the trainer's all-reduce and the checkpoint's barriers."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


@dataclass
class Output:
    loss: torch.Tensor


class Tiny(nn.Module):
    """Next-token logits from token embeddings plus a projected visual vector."""

    image_tokens = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.visual = nn.Linear(4, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, batch: Batch) -> Output:
        hidden = self.embed(batch.input_ids) + self.visual(batch.visual["x"]).unsqueeze(1)
        logits = self.head(hidden)
        return Output(F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX))


def grad_norm(module: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()])))


class StandInEngine:
    """What the Trainer and the Checkpointer use of DeepSpeed's engine: backward scales the loss by
    1/grad_accum, step() updates the weights (and the learning rate) at each accumulation boundary and
    skips a non-finite gradient whole (weights, momentum and schedule untouched; counted in skipped_steps),
    checkpoints hold the training state and the client state."""

    device = torch.device("cpu")

    def __init__(self, grad_accum: int):
        self.module, self.grad_accum = Tiny(), grad_accum
        self.optimizer = torch.optim.SGD(self.module.parameters(), **SGD)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.skipped_steps, self.micro_steps, self.grad_norm = 0, 0, None
        self.seen: list[str] = []  # keys of the micro-batches it trained on, in order

    def __call__(self, batch: Batch) -> Output:
        self.seen.extend(batch.keys)
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        self.grad_norm = grad_norm(self.module)
        if math.isfinite(self.grad_norm):
            self.optimizer.step()
            self.lr_scheduler.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, save_latest: bool,
                        exclude_frozen_parameters: bool) -> None:
        torch.save({**client_state, "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps},
                   Path(directory) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, directory: str, tag: str, load_module_strict: bool) -> tuple[str, dict]:
        path = Path(directory) / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=False)
        self.module.load_state_dict(state.pop("module"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.lr_scheduler.load_state_dict(state.pop("scheduler"))
        self.micro_steps = state.pop("micro_steps")
        return str(path), state


def micro_batch(epoch: int, index: int, nan: bool = False) -> Batch:
    """Two samples of random tokens; answers are the last three positions."""
    gen = torch.Generator().manual_seed(1000 * epoch + index)
    input_ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    labels[:, :3] = IGNORE_INDEX
    x = torch.randn(2, 4, generator=gen)
    if nan:
        x[0, 0] = math.nan
    return Batch(input_ids, torch.zeros(2, 6, dtype=torch.bool), torch.ones(2, 6, dtype=torch.long), labels, {"x": x},
                 Visual.CACHE, [f"e{epoch}b{index}s{j}" for j in range(2)], truncated=index % 2,
                 dropped=[f"e{epoch}b{index}d"] if index == 2 else [])


class ListStream:
    """Stand-in for TrainStream: epoch `e` is micro_batch(e, 0..STREAM_LEN-1); `nan` marks (epoch, index) pairs."""

    def __init__(self, nan: frozenset[tuple[int, int]] = frozenset()):
        self.nan = nan

    def batches(self, epoch: int, skip: int = 0, per_epoch: int | None = None):
        while True:
            for index in range(skip, STREAM_LEN if per_epoch is None else per_epoch):
                yield epoch, micro_batch(epoch, index, (epoch, index) in self.nan)
            epoch, skip = epoch + 1, 0


# what `data_record` says of a stage's data; the tests of the data check below record real shard sets
DATA = {"shards": "0" * 64, "split": "train", "tasks": ["identify"], "findings_only": True, "preparation": {}}


def make_trainer(run_dir: Path, *, grad_accum: int = 2, epochs: int = 2, max_nonfinite: int = 3, nan=frozenset(),
                 inject=(), state: TrainState | None = None, preemption: Preemption | None = None,
                 data: dict = DATA) -> Trainer:
    cfg = TrainConfig(model="unused.yaml", run=RunSection(dir=str(run_dir)),
                      train=TrainSection(grad_accum=grad_accum, epochs=epochs, max_nonfinite=max_nonfinite),
                      checkpoint=CheckpointSection(save_every=1000, keep_last=2), log=LogSection(every=2))
    cfg.stage_dir.mkdir(parents=True, exist_ok=True)
    schedule = Schedule.plan(STREAM_LEN, cfg.train)
    start = 0 if state is None else state.step
    monitor = Monitor(cfg.stage_dir, True, cfg.log.every, schedule.total_steps, start, FlopModel(10, 2, 3, 1, WIDTH),
                      None, 1)
    checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, 0, 1, data)
    return Trainer(cfg, StandInEngine(grad_accum), ListStream(nan), schedule, checkpointer, monitor,
                   Grammar(VINDR_CXR), state, preemption, inject)


def records(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.cfg.stage_dir / "metrics.jsonl").read_text().splitlines()]


def by_hand(steps: list[list[Batch]], skip: set[str] = frozenset()) -> tuple[list[dict], nn.Module]:
    """The same training as a plain loop: per step, the mean loss of its finite micro-batches and SGD on the
    summed gradients / micro-batches; a step with a non-finite micro-batch (or one whose keys are in `skip`)
    is skipped whole: no update, the momentum and the schedule stay."""
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    out = []
    for batches in steps:
        lr = scheduler.get_last_lr()[0]
        losses = [model(b).loss for b in batches]
        kept = [loss for loss, b in zip(losses, batches) if torch.isfinite(loss) and b.keys[0] not in skip]
        loss = sum(v.item() for v in kept) / len(kept) if kept else math.nan
        if len(kept) < len(batches):
            out.append({"loss": loss, "lr": lr, "grad_norm": math.nan})
            continue
        for v in kept:
            (v / len(batches)).backward()
        out.append({"loss": loss, "lr": lr, "grad_norm": grad_norm(model)})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out, model


def consumed(epochs: int, per_epoch: int, grad_accum: int, nan=frozenset()) -> list[list[Batch]]:
    """The micro-batches of each optimizer step: the first `per_epoch` of every epoch, in order."""
    flat = [micro_batch(e, i, (e, i) in nan) for e in range(epochs) for i in range(per_epoch)]
    return [flat[i:i + grad_accum] for i in range(0, len(flat), grad_accum)]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, msg=name)


def test_schedule_counts_whole_steps():
    schedule = Schedule.plan(STREAM_LEN, TrainSection(grad_accum=2, epochs=3))
    assert (schedule.steps_per_epoch, schedule.trained_per_epoch, schedule.total_steps) == (2, 4, 6)
    assert Schedule.plan(STREAM_LEN, TrainSection(grad_accum=2, epochs=3, max_steps=5)).total_steps == 5
    with pytest.raises(ConfigError, match="fewer than train.grad_accum"):
        Schedule.plan(1, TrainSection(grad_accum=2))


def test_train_state_round_trips_through_state_dict():
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, samples_seen=40, skipped_microbatches=2,
                       truncated_answers=5, dropped_samples=1)
    saved = json.loads(json.dumps(state.state_dict()))  # plain data, as a checkpoint's client state holds it
    assert set(saved) == {"step", "epoch", "batch_in_epoch", "samples_seen", "skipped_microbatches",
                          "truncated_answers", "dropped_samples"}  # the keys checkpoints have always had
    restored = TrainState()
    restored.load_state_dict({**saved, "config_digest": "abc", "world_size": 2})
    assert restored == state


def test_train_step_is_one_micro_batch(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = micro_batch(0, 1)
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    expected = Tiny()(batch).loss.item()
    micro = trainer.train_step(batch)
    not_finite, loss_sum, stop = micro.agreed.tolist()  # what the step's end reads
    assert loss_sum == pytest.approx(expected, rel=1e-6) and not_finite == 0 and stop == 0
    assert (micro.samples, int(micro.tokens), micro.seq_len, micro.image_tokens) == (2, 12, 6, 2 * Tiny.image_tokens)
    assert micro.lr == LR
    # the first of two micro-batches: accumulated, not applied
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
    assert trainer.state == TrainState(batch_in_epoch=1, samples_seen=2, truncated_answers=1)
    trainer.close()


class HostReads(TorchFunctionMode):
    """Counts the tensor calls that copy values to the host (on a GPU each waits for the queued work)."""

    READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__repr__", "__format__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("inject", [(), (2,)])
def test_host_reads_are_per_optimizer_step_not_per_micro_batch(tmp_path, inject):
    """The same 5 optimizer steps with 1 and with 5 micro-batches each read the device equally often: the
    loss, the finite flags and the stop request once per step, the token counts once per report."""
    reads = {}
    for grad_accum in (1, 5):
        trainer = make_trainer(tmp_path / str(grad_accum), grad_accum=grad_accum, epochs=grad_accum, inject=inject)
        assert trainer.schedule.total_steps == 5
        with HostReads() as counter:
            assert trainer.fit() is ExitCode.DONE
        trainer.close()
        reads[grad_accum] = counter.count
        assert [r["skipped_steps"] for r in records(trainer)][-1] == len(inject)
    assert reads[5] == reads[1]
    # per step: the stand-in engine's norm, the agreed rows; per report (2 of 5 steps): the token and FLOP counts
    assert reads[1] <= 5 * 2 + 2 * 1 + 1  # + the final checkpoint's RNG state


def test_fit_averages_micro_batches_per_step_and_rolls_epochs(tmp_path):
    trainer = make_trainer(tmp_path, grad_accum=2, epochs=2)
    assert trainer.fit() is ExitCode.DONE
    trainer.close()
    steps = consumed(2, 4, 2)
    # the fifth micro-batch of each epoch is left out; the second epoch starts at its first
    assert trainer.engine.seen == [k for step in steps for b in step for k in b.keys]
    expected, model = by_hand(steps)
    rows = records(trainer)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["epoch"] for r in rows] == [0, 0, 1, 1]
    for row, want in zip(rows, expected):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert row["lr"] == pytest.approx(want["lr"]) and row["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert_same_weights(trainer.engine.module, model)
    batches = [b for step in steps for b in step]
    assert rows[-1]["truncated_answers"] == sum(b.truncated for b in batches)
    assert rows[-1]["dropped_samples"] == sum(len(b.dropped) for b in batches)
    assert all(r["skipped_microbatches"] == 0 and r["skipped_steps"] == 0 for r in rows)
    # throughput every log.every = 2 steps, in the same line
    assert ["samples_per_s" in r for r in rows] == [False, True, False, True]
    assert rows[1]["mean_loss"] == pytest.approx((expected[0]["loss"] + expected[1]["loss"]) / 2, rel=1e-6)
    assert trainer.state == TrainState(step=4, epoch=2, batch_in_epoch=0, samples_seen=2 * len(batches),
                                       truncated_answers=rows[-1]["truncated_answers"],
                                       dropped_samples=rows[-1]["dropped_samples"])
    assert (trainer.cfg.stage_dir / "checkpoints/latest").read_text() == "step00000004"  # the last step


def test_a_nonfinite_micro_batch_skips_its_whole_step_and_is_counted(tmp_path):
    nan = frozenset({(0, 3)})  # the second micro-batch of step 2
    trainer = make_trainer(tmp_path, nan=nan)
    assert trainer.fit() is ExitCode.DONE
    trainer.close()
    expected, model = by_hand(consumed(2, 4, 2, nan))
    rows = records(trainer)
    assert math.isfinite(rows[1]["loss"]) and rows[1]["loss"] == pytest.approx(expected[1]["loss"], rel=1e-6)
    assert [r["skipped_microbatches"] for r in rows] == [0, 1, 1, 1]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert [r["lr"] for r in rows] == pytest.approx([e["lr"] for e in expected])
    assert rows[2]["lr"] == rows[1]["lr"]  # the schedule did not advance
    assert_same_weights(trainer.engine.module, model)  # step 2 changed nothing; the others trained as usual


@pytest.mark.parametrize("inject, code, rows_written", [
    ({2}, ExitCode.DONE, 4), ({1, 3}, ExitCode.DONE, 4),  # a finite step between restarts the count
    ({2, 3}, ExitCode.NONFINITE, 3)])
def test_injected_nonfinite_steps_stop_the_run_at_the_limit(tmp_path, capsys, inject, code, rows_written):
    trainer = make_trainer(tmp_path, max_nonfinite=2, inject=inject)
    assert trainer.fit() is code
    trainer.close()
    rows = records(trainer)
    assert len(rows) == rows_written
    assert [math.isnan(r["loss"]) for r in rows] == [r["step"] in inject for r in rows]
    assert rows[-1]["skipped_microbatches"] == 2 * len(inject)
    steps = consumed(2, 4, 2)
    expected, model = by_hand(steps[:rows_written], skip={b.keys[0] for s in inject for b in steps[s - 1]})
    assert_same_weights(trainer.engine.module, model)
    stopped = "2 optimizer steps in a row had a non-finite loss" in capsys.readouterr().err
    assert stopped == (code is ExitCode.NONFINITE)


def test_preemption_checkpoints_and_a_resumed_run_continues_exactly(tmp_path, capsys):
    reference = make_trainer(tmp_path / "reference")
    reference.fit()
    reference.close()

    preemption = Preemption()
    preemption.requested = True  # as the signal handler sets it
    trainer = make_trainer(tmp_path / "preempted", preemption=preemption)
    assert trainer.fit() is ExitCode.PREEMPTED
    trainer.close()
    assert "checkpoint written at step 1; exit 75" in capsys.readouterr().out
    assert (trainer.cfg.stage_dir / "checkpoints/latest").read_text() == "step00000001"

    resumed = make_trainer(tmp_path / "preempted")
    state = resumed.checkpointer.load(resumed.engine, resumed.cfg.digest())
    resumed.state.load_state_dict(state)
    assert resumed.state == trainer.state == TrainState(step=1, batch_in_epoch=2, samples_seen=4, truncated_answers=1)
    assert resumed.fit() is ExitCode.DONE
    resumed.close()
    assert_same_weights(resumed.engine.module, reference.engine.module)
    assert {r["step"]: r["loss"] for r in records(resumed)} == {r["step"]: r["loss"] for r in records(reference)}


def draws() -> tuple:
    """A number from each RNG a resumed run restores (LoRA dropout draws from torch's)."""
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn()


def test_checkpoint_files_of_ours_are_json_and_restore_the_rngs_exactly(tmp_path):
    """Nothing of ours is unpickled on resume: our files read as JSON, and the RNGs continue exactly."""
    trainer = make_trainer(tmp_path)
    np.random.randn()  # numpy's cached second Gaussian is part of its state
    tag = trainer.checkpointer.save(trainer.engine, {**trainer.state.state_dict(), "config_digest": trainer.cfg.digest()})
    expected = draws()
    ours = sorted(p.name for p in (trainer.checkpointer.directory / tag).iterdir() if p.name != "mp_rank_00_model_states.pt")
    assert ours == ["rng_rank00000.json", "run.json"]
    for name in ours:
        json.loads((trainer.checkpointer.directory / tag / name).read_text())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    assert trainer.checkpointer.load(trainer.engine, trainer.cfg.digest())["step"] == 0
    assert draws() == expected
    trainer.close()


def test_a_checkpoint_written_before_the_run_record_is_refused(tmp_path):
    """Its RNG states are pickles and it does not know its data: refused with the way out, not unpickled."""
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    trainer.close()
    tag_dir = trainer.checkpointer.directory / "step00000002"
    (tag_dir / "run.json").unlink()  # what earlier versions wrote: DeepSpeed's files and rng_rank00000.pt
    (tag_dir / "rng_rank00000.json").unlink()
    torch.save({"torch": torch.get_rng_state()}, tag_dir / "rng_rank00000.pt")
    with pytest.raises(ResumeError, match=r"has no run.json: an earlier litegpt.*--resume none"):
        make_trainer(tmp_path).checkpointer.load(trainer.engine, trainer.cfg.digest())


def resume(run_dir: Path, data: dict) -> dict | None:
    """The client state of the checkpoint in `run_dir`, restored by a stage whose data record is `data`."""
    again = make_trainer(run_dir, epochs=1, data=data)
    try:
        return again.checkpointer.load(again.engine, again.cfg.digest())
    finally:
        again.close()


def test_a_checkpoint_refuses_other_data(tmp_path, make_shards):
    """Shards rewritten in place, or another split or filter: the resume is refused, saying what changed."""
    shards = make_shards(tmp_path / "shards", {"train": [3, 2], "test": [2]})
    cfg = TrainConfig(model="unused.yaml", data=DataSection(shards=str(shards)))
    trainer = make_trainer(tmp_path / "run", epochs=1, data=data_record(cfg))
    trainer.fit()
    trainer.close()

    assert resume(tmp_path / "run", data_record(cfg))["step"] == 2  # the same data resumes
    with pytest.raises(ResumeError, match=r"trained on other data \(findings_only was True, now False\): use a new "
                                          r"run.dir, or --resume none"):
        resume(tmp_path / "run", data_record(dataclasses.replace(cfg, stage=StageSection(findings_only=False))))
    make_shards(shards, {"train": [3, 2], "test": [2]}, seed=1)  # other pixels; the same names and counts
    with pytest.raises(ResumeError, match=r"the shards of split 'train' differ: re-prepared or altered"):
        resume(tmp_path / "run", data_record(cfg))


# A dataset that is not VinDr-CXR, in other words: the tiny shards' labels (Cardiomegaly, COPD, No finding) in
# another vocabulary (other labels, another order) and template.
OTHER = Grammar(Vocabulary.build("chest-other", ["Mass", "Cardiomegaly"], ["Fibrosis", "COPD"]),
                TaskTemplate(identify="Box every finding.", vqa="Which of {global_choices} apply?",
                             local_prefix="Findings:", global_prefix="Diagnoses:", no_findings_prefix="I see",
                             no_findings="nothing of note", no_diagnosis="nothing"))


def with_grammar(shards: Path, grammar: Grammar) -> Path:
    """The shard set's manifest records `grammar`, as `litegpt prepare` records a dataset's."""
    write_json_atomic(shards / MANIFEST, {**read_manifest(shards), **grammar.to_dict()})
    return shards


def test_the_stream_renders_its_shard_sets_labels_and_sentences(tmp_path, make_shards, tiny_config):
    """Prompts and answers come from the manifest's vocabulary and template; the spec pickles for loader workers."""
    shards = with_grammar(make_shards(tmp_path / "shards", {"train": [2]}), OTHER)
    cfg = TrainConfig(model="unused.yaml", data=DataSection(shards=str(shards), features=Visual.LIVE),
                      stage=StageSection(tasks=("identify", "vqa"), findings_only=False))
    stream = TrainStream.from_recipe(cfg, tiny_config, shards, 0, 1)
    spec = pickle.loads(pickle.dumps(stream.spec))
    assert spec.grammar.to_dict() == OTHER.to_dict() and spec.grammar.parse("Findings: <p>Mass</p> {<1><2><3><4>}."
                                                                            ).findings == [("Mass", (1, 2, 3, 4))]
    texts = [(s.prompt, s.answer) for raw in read_samples(shard_paths(shards, "train")) for s in stream._samples(raw)]
    assert texts == [
        ("[INST] <Img><ImageHere></Img> [identify] Box every finding. [/INST]", "I see nothing of note."),
        ("[INST] <Img><ImageHere></Img> [vqa] Which of Fibrosis, COPD, or No Finding apply? [/INST]",
         "Diagnoses: No finding."),
        ("[INST] <Img><ImageHere></Img> [identify] Box every finding. [/INST]",
         "Findings: <p>Cardiomegaly</p> {<30><50><70><80>}."),
        ("[INST] <Img><ImageHere></Img> [vqa] Which of Fibrosis, COPD, or No Finding apply? [/INST]",
         "Diagnoses: COPD."),
    ]


def test_a_vocabulary_that_cannot_be_used_is_named_by_its_manifest(tmp_path, make_shards):
    shards = make_shards(tmp_path / "shards", {"train": [2]})
    write_json_atomic(shards / MANIFEST, {**read_manifest(shards), "vocabulary": {"name": "x", "local_labels": []}})
    with pytest.raises(VocabularyError, match="^" + re.escape(f"{shards / MANIFEST}: ") + ".*no local labels"):
        stage_grammar(TrainConfig(model="unused.yaml", data=DataSection(shards=str(shards))))


def test_a_checkpoint_refuses_another_vocabulary_and_one_that_records_none_is_vindr(tmp_path, make_shards):
    """Checkpoints written before vocabularies were recorded resume on VinDr-CXR shards as before; the same
    shards in another vocabulary are other data, named."""
    shards = make_shards(tmp_path / "shards", {"train": [3, 2], "test": [2]})
    cfg = TrainConfig(model="unused.yaml", data=DataSection(shards=str(shards)))
    record = data_record(cfg)
    assert Grammar.from_record(record).to_dict() == Grammar(VINDR_CXR).to_dict()
    trainer = make_trainer(tmp_path / "run", epochs=1,
                           data={k: v for k, v in record.items() if k not in ("vocabulary", "template")})
    trainer.fit()
    trainer.close()
    assert resume(tmp_path / "run", record)["step"] == 2

    other = with_grammar(Path(shutil.copytree(shards, tmp_path / "other")), OTHER)  # the same shard files
    with pytest.raises(ResumeError, match=r"trained on other data \(the label vocabulary was 'vindr-cxr' \(22 local, "
                                          r"6 global labels\), now 'chest-other' \(2 local, 3 global labels\); the "
                                          r"task template's identify, vqa, local_prefix, global_prefix, "
                                          r"no_findings_prefix, no_findings, no_diagnosis differ\): use a new run.dir"):
        resume(tmp_path / "run", data_record(dataclasses.replace(cfg, data=DataSection(shards=str(other)))))


def test_a_stage_refuses_an_export_of_another_vocabulary_before_any_work(tmp_path, make_shards, tiny_model):
    """stage.init_from on shards of another vocabulary: refused when the recipe is checked, naming both; exports
    written before vocabularies were recorded are VinDr-CXR's."""
    from litegpt.model.export import INFO, save_export, verify_export

    shards = with_grammar(make_shards(tmp_path / "shards", {"train": [3, 2], "test": [2]}), OTHER)
    export = tmp_path / "runs/stage1/export"
    save_export(tiny_model, export, {"stage": "stage1", **OTHER.to_dict()})
    cfg = TrainConfig(model="unused.yaml", data=DataSection(shards=str(shards)),
                      stage=StageSection(name="stage2", tasks=("vqa",), findings_only=False, init_from=str(export)))
    check_inputs(cfg)  # the same vocabulary

    info = json.loads((export / INFO).read_text())
    (export / INFO).write_text(json.dumps({k: v for k, v in info.items() if k not in ("vocabulary", "template")}))
    verify_export(export)  # export.json's hashes are of the other files: a sound export, of VinDr-CXR
    refusal = (f"stage.init_from = {export} uses the label vocabulary 'vindr-cxr' (22 local, 6 global labels), but "
               f"the shard set {shards} uses 'chest-other' (2 local, 3 global labels); they must be the same")
    with pytest.raises(VocabularyMismatch) as refused:
        check_inputs(cfg)
    assert str(refused.value) == refusal

    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny/stage2.yaml"),
                           "--deepspeed", str(REPO / "ds_configs/zero2.json"), "--set", f"run.dir={tmp_path / 'runs'}",
                           "--set", f"data.shards={shards}", "--set", f"stage.init_from={export}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"train.py: {refusal}"]
    assert not (tmp_path / "runs/stage2").exists()
