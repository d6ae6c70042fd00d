"""The SLURM scripts against real SLURM daemons (munged, slurmctld, slurmd) started on this machine.

The stage scripts run unchanged; where train.py is not the subject, `LITEGPT_PYTHON` points at a small
shell script that records how it was called and exits as train.py would (75 = checkpointed, requeue me).
The tests marked slow (`pytest tests/test_slurm.py -m slow`) run the real train.py on the tiny preset.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import ClusterUnavailable, SlurmCluster, slurm_cluster

REPO = Path(__file__).resolve().parent.parent
STAGE1 = REPO / "slurm" / "stage1.sh"


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    """One cluster for the session with 2 fake GPUs; the daemons are stopped however the tests end."""
    try:
        with slurm_cluster(gpus=2) as cluster:
            yield cluster
    except ClusterUnavailable as exc:
        pytest.skip(f"no SLURM cluster on this machine: {exc}")


def fake_python(directory: Path, body: str) -> Path:
    """An executable standing in for the interpreter: `$LITEGPT_PYTHON train.py ...` runs `body`."""
    path = directory / "fake-python"
    path.write_text("#!/usr/bin/env bash\n"
                    'echo "task procid=$SLURM_PROCID restart=${SLURM_RESTART_COUNT:-0} args=$*"\n' + body)
    path.chmod(0o755)
    return path


def sbatch_stage1(slurm: SlurmCluster, tmp_path: Path, env: dict[str, str], *options: str) -> tuple[str, Path]:
    """sbatch slurm/stage1.sh unchanged, from the repository root, 2 tasks on 2 fake GPUs: (job id, log)."""
    job_id = slurm.sbatch("--gres=gpu:2", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={tmp_path}/%x-%j.out", *options, str(STAGE1), env=env, cwd=REPO)
    return job_id, tmp_path / f"litegpt-stage1-{job_id}.out"


def run_stage1(slurm: SlurmCluster, tmp_path: Path, env: dict[str, str], *options: str) -> tuple[dict, str]:
    """sbatch_stage1 and wait for the job (requeues included): (final job record, log text)."""
    job_id, log = sbatch_stage1(slurm, tmp_path, env, *options)
    job = slurm.wait(job_id, timeout=120)
    return job, log.read_text()


def test_cluster_runs_tasks_on_fake_gpus(slurm, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/bash\nsrun bash -c \'echo "rank=$SLURM_PROCID gpus=$CUDA_VISIBLE_DEVICES '
                      'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")"\'\n')
    job_id = slurm.sbatch("--gres=gpu:2", "--ntasks=2", f"--output={tmp_path}/hello-%j.out", str(script))
    job = slurm.wait(job_id, timeout=60)
    out = (tmp_path / f"hello-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", (job, out)
    lines = re.findall(r"rank=(\d+) gpus=(\S*) hosts=(\S+)", out)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"], out
    assert {gpus for _, gpus, _ in lines} == {"0,1"}, out
    assert {host for _, _, host in lines} == {slurm.node}, out
    assert slurm.cmd("squeue", "-h").stdout.strip() == ""
    assert "idle" in slurm.cmd("sinfo", "-h", "-o", "%T").stdout


def test_stage1_requeues_on_exit_75(slurm, tmp_path):
    python = fake_python(tmp_path, '[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && exit 75\nexit 0\n')
    job, out = run_stage1(slurm, tmp_path, {"LITEGPT_PYTHON": str(python), "LITEGPT_CONFIG": "recipe.yaml",
                                               "LITEGPT_TRAIN_ARGS": "--set a=1 --set b=2"})
    assert out.count("restart=0 args=") == 2 and out.count("restart=1 args=") == 2, out
    assert "requeueing job" in out, out
    assert "train.py --config recipe.yaml --deepspeed ds_configs/zero2.json --resume auto --set a=1 --set b=2" in out
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["ExitCode"] == "0:0", job


def test_stage1_propagates_other_exit_codes(slurm, tmp_path):
    python = fake_python(tmp_path, "exit 3\n")
    job, out = run_stage1(slurm, tmp_path, {"LITEGPT_PYTHON": str(python)})
    assert out.count("restart=0 args=") == 2 and "requeueing" not in out, out
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0" and job["ExitCode"] == "3:0", job


def test_stage1_time_limit_signal_reaches_tasks(slurm, tmp_path):
    # First run: wait for the warning signal like train.py, "checkpoint", exit 75. The script's own
    # --signal=USR1@300 with a one-minute limit fires at once (slurmctld checks limits every 30 s).
    python = fake_python(tmp_path, 'trap \'echo "procid=$SLURM_PROCID got USR1"; exit 75\' USR1\n'
                                   '[ "${SLURM_RESTART_COUNT:-0}" = 0 ] || exit 0\n'
                                   "while true; do sleep 0.2; done\n")
    job, out = run_stage1(slurm, tmp_path, {"LITEGPT_PYTHON": str(python)}, "--time=1")
    assert sorted(re.findall(r"procid=(\d) got USR1", out)) == ["0", "1"], out
    assert out.count("restart=1 args=") == 2, out
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job


def test_scancel_is_final(slurm, tmp_path):
    # The tasks answer SIGTERM like train.py (exit 75), but a cancelled job must not come back.
    python = fake_python(tmp_path, 'trap "exit 75" TERM\nwhile true; do sleep 0.2; done\n')
    job_id, log = sbatch_stage1(slurm, tmp_path, {"LITEGPT_PYTHON": str(python)})
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().count("restart=0 args=") == 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    slurm.cmd("scancel", job_id)
    job = slurm.wait(job_id, timeout=60)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", (job, log.read_text())


def test_pipeline_chains_jobs_and_stops_after_a_failure(slurm, tmp_path):
    record = tmp_path / "calls.txt"
    fail_on = tmp_path / "fail-on"
    python = fake_python(tmp_path, f'echo "$SLURM_JOB_NAME $*" >> {record}\n'
                                   f'grep -qx -- "$3" {fail_on} 2>/dev/null && exit 1\nexit 0\n')
    for name in ("root", "model.yaml", "s1.yaml", "s2.yaml"):
        (tmp_path / name).touch()
    env = {"LITEGPT_PYTHON": str(python), "LITEGPT_ROOT": str(tmp_path / "root"),
           "LITEGPT_SHARDS": str(tmp_path / "shards"), "LITEGPT_MODEL": str(tmp_path / "model.yaml"),
           "LITEGPT_STAGE1_CONFIG": str(tmp_path / "s1.yaml"), "LITEGPT_STAGE2_CONFIG": str(tmp_path / "s2.yaml"),
           "LITEGPT_EVAL_RUN": str(tmp_path / "runs" / "stage2"),
           "LITEGPT_LOGS": str(tmp_path / "logs"),
           "LITEGPT_PREPARE_SBATCH": "--cpus-per-task=2", "LITEGPT_CACHE_SBATCH": "--gres=gpu:1",
           "LITEGPT_TRAIN_SBATCH": "--gres=gpu:2 --ntasks-per-node=2 --cpus-per-task=1",
           "LITEGPT_EVAL_SBATCH": "--gres=gpu:1"}

    def run_pipeline() -> dict[str, str]:
        out = slurm.cmd("bash", "slurm/pipeline.sh", env=env, cwd=REPO).stdout
        ids = dict(line.split() for line in out.splitlines())
        assert list(ids) == ["prepare", "cache-features", "stage1", "stage2", "evaluate"], out
        for job_id in ids.values():
            slurm.wait(job_id, timeout=60)
        return {step: slurm.job(job_id)["JobState"] for step, job_id in ids.items()}

    states = run_pipeline()
    assert set(states.values()) == {"COMPLETED"}, states
    calls = record.read_text().splitlines()
    shards = env["LITEGPT_SHARDS"]
    assert calls == [
        f"litegpt-prepare -m litegpt.cli prepare --root {env['LITEGPT_ROOT']} --out {shards} --workers 2",
        f"litegpt-cache -m litegpt.cli cache-features --shards {shards} --model {env['LITEGPT_MODEL']}",
        *[f"litegpt-stage1 train.py --config {env['LITEGPT_STAGE1_CONFIG']} --deepspeed ds_configs/zero2.json "
          "--resume auto"] * 2,
        *[f"litegpt-stage2 train.py --config {env['LITEGPT_STAGE2_CONFIG']} --deepspeed ds_configs/zero2.json "
          "--resume auto"] * 2,
        f"litegpt-evaluate -m litegpt.cli evaluate --run {env['LITEGPT_EVAL_RUN']} --shards {shards}",
    ]

    record.unlink()
    fail_on.write_text("cache-features\n")
    states = run_pipeline()
    assert states["prepare"] == "COMPLETED" and states["cache-features"] == "FAILED", states
    assert {states[step] for step in ("stage1", "stage2", "evaluate")} == {"CANCELLED"}, states
    assert len(record.read_text().splitlines()) == 2


def train_env(tiny_config, prepared, tmp_path: Path, *overrides: str) -> dict[str, str]:
    """Environment for slurm/stage1.sh running the real train.py on the tiny preset (session weights and shards)."""
    model = tmp_path / "model_tiny.yaml"
    model.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_config.to_dict()))))
    sets = [f"run.dir={tmp_path / 'runs'}", f"data.shards={prepared}", f"model={model}",
            "train.micro_batch=4", "train.epochs=3", *overrides]  # the session shards are small
    return {"LITEGPT_PYTHON": sys.executable, "LITEGPT_CONFIG": "configs/tiny/stage1.yaml",
            "LITEGPT_TRAIN_ARGS": " ".join(f"--set {item}" for item in sets),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def needs_train_py() -> None:
    if not (REPO / "train.py").exists():
        pytest.skip("train.py does not exist yet")


@pytest.mark.slow
def test_stage1_trains_under_slurm(slurm, prepared, tiny_config, tmp_path):
    needs_train_py()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job_id, log = sbatch_stage1(slurm, tmp_path, train_env(tiny_config, prepared, tmp_path), "--time=15")
    job = slurm.wait(job_id, timeout=600)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log.read_text()[-5000:])
    stage = tmp_path / "runs" / "stage1"
    assert (stage / "checkpoints" / "latest").is_file()
    accumulator = EventAccumulator(str(stage / "tensorboard"))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]


@pytest.mark.slow
def test_stage1_survives_preemption_under_slurm(slurm, prepared, tiny_config, tmp_path):
    """USR1 mid-training (as SLURM sends it to the steps) -> checkpoint, exit 75, requeue, resume, finish."""
    needs_train_py()
    env = train_env(tiny_config, prepared, tmp_path, "train.epochs=40")  # long enough to be signalled mid-run
    job_id, _ = sbatch_stage1(slurm, tmp_path, env, "--time=15")
    metrics = tmp_path / "runs" / "stage1" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    slurm.cmd("scancel", "--signal=USR1", job_id)  # like --signal=USR1@300: the steps, not the batch shell
    job = slurm.wait(job_id, timeout=600)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps.count(1) == 1, steps  # the second run resumed from the checkpoint, not from scratch
    assert sorted(set(steps)) == list(range(1, max(steps) + 1)), steps
    latest = (metrics.parent / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{max(steps):08d}"
