"""The training harness for real: DeepSpeed ZeRO-2 on 2 CPU ranks over gloo, tiny preset.

One session run (stage 1 then stage 2) is shared by most tests; the kill-and-resume test makes a
second run of the same stage 1 and compares it step by step with the first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from litegpt.distributed import free_port
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def command(recipe: Path, ranks: int, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    train = [str(REPO / "train.py"), "--config", str(recipe), "--deepspeed", str(REPO / "ds_configs/zero2.json")]
    train += [a for o in overrides for a in ("--set", o)] + list(flags)
    if ranks == 1:
        return [sys.executable, *train]
    return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), *train]


def run(recipe: Path, ranks: int, *overrides: str, check: bool = True,
        flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    done = subprocess.run(command(recipe, ranks, *overrides, flags=flags), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"train.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def losses(stage_dir: Path) -> dict[int, float]:
    """Per-step loss from metrics.jsonl; a resumed run's later lines replace the repeated steps."""
    return {step: row["loss"] for step, row in metric_rows(stage_dir, "loss").items()}


def validations(stage_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step validation figures from metrics.jsonl (the time each took left out)."""
    return {step: {k: v for k, v in row.items() if k not in ("step", "val/seconds")}
            for step, row in metric_rows(stage_dir, "val/loss").items()}


def metric_rows(stage_dir: Path, key: str) -> dict[int, dict]:
    """The metrics.jsonl lines with `key` by step, the last one of a step kept."""
    lines = (json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row for row in lines if key in row}


@pytest.fixture(scope="session")
def recipes(tiny_config, prepared, tmp_path_factory) -> dict[str, Path]:
    """The tiny stage recipes pointed at the session's weights, shards and a fresh run directory."""
    root = tmp_path_factory.mktemp("train")
    model = root / "model_tiny.yaml"
    model.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_config.to_dict()))))
    out = {}
    for name in ("stage1", "stage2"):
        data = yaml.safe_load((REPO / "configs/tiny" / f"{name}.yaml").read_text())
        data["model"] = str(model)
        data["run"]["dir"] = str(root / "runs/a")
        data["data"]["shards"] = str(prepared)
        data["train"].update(micro_batch=2, epochs=6)
        data["checkpoint"]["save_every"] = 4
        data["log"]["every"] = 2
        data["eval"] = {"fraction": 0.25, "every": 4, "generate": 2, "batch": 4, "best": "loss"}
        if name == "stage2":  # from stage 1's best validation loss (its last step's export is beside it)
            data["stage"]["init_from"] = str(root / "runs/a/stage1/export-best")
        out[name] = root / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(data))
    out["root"] = root
    return out


@pytest.fixture(scope="session")
def two_rank_run(recipes) -> Path:
    """Stage 1 then stage 2, each on 2 ranks; returns the run directory."""
    run(recipes["stage1"], 2)
    run(recipes["stage2"], 2)
    return recipes["root"] / "runs/a"


def test_both_stages_train_checkpoint_and_export(two_rank_run):
    for stage in ("stage1", "stage2"):
        stage_dir = two_rank_run / stage
        steps = losses(stage_dir)
        assert steps and all(v == v for v in steps.values())  # finite
        latest = (stage_dir / "checkpoints/latest").read_text().strip()
        assert latest == f"step{max(steps):08d}"
        for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "projector.safetensors",
                     "model.yaml", "export.json"):
            assert (stage_dir / "export" / name).is_file()
        info = json.loads((stage_dir / "export/export.json").read_text())  # the text it trained on, for inference
        assert {k: info[k] for k in ("vocabulary", "template")} == Grammar(VINDR_CXR).to_dict()
        assert yaml.safe_load((stage_dir / "config.yaml").read_text())["stage"]["name"] == stage
    first = losses(two_rank_run / "stage1")
    assert first[max(first)] < first[1]  # it learns something


def test_validation_runs_every_eval_every_steps_and_at_the_end_and_export_best_holds_the_best(two_rank_run):
    for stage in ("stage1", "stage2"):
        stage_dir = two_rank_run / stage
        last = max(losses(stage_dir))
        figures = validations(stage_dir)
        assert sorted(figures) == sorted({*range(4, last + 1, 4), last})
        assert all(math.isfinite(f["val/loss"]) and 0 <= f["val/parse/all_rate"] <= 1 for f in figures.values())
        best_step = min(figures, key=lambda s: (figures[s]["val/loss"], s))
        info = json.loads((stage_dir / "export-best/export.json").read_text())
        assert (info["step"], info["best"]) == (best_step, {"figure": "loss", "value": figures[best_step]["val/loss"]})
        assert json.loads((stage_dir / "export/export.json").read_text())["step"] == last
    task_figures = {"stage1": "val/strict/local/micro_avg_f1", "stage2": "val/strict/global/micro_avg_f1"}
    for stage, name in task_figures.items():
        assert all(name in f for f in validations(two_rank_run / stage).values())
    first = validations(two_rank_run / "stage1")
    assert first[max(first)]["val/loss"] < first[min(first)]["val/loss"]  # the validation loss falls too


def test_checkpoint_consolidates_with_zero_to_fp32(two_rank_run, tiny_config):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    stage_dir = two_rank_run / "stage1"
    state = get_fp32_state_dict_from_zero_checkpoint(str(stage_dir / "checkpoints"), exclude_frozen_parameters=True)
    # what the adapter holds: LoRA on the preset's target modules, and the modules it trains in full
    trained = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}
    lora = [k for k in trained if "lora_" in k]
    assert lora and all(any(f".{t}.lora_" in k for t in tiny_config.lora.target_modules) for k in lora)
    assert len(trained) - len(lora) == len(tiny_config.lora.modules_to_save)
    exported = load_file(stage_dir / "export/projector.safetensors")
    for name, tensor in exported.items():
        if name.startswith("projector."):
            assert torch.equal(state[name], tensor), name  # the export is the checkpoint's final weights
    adapter = load_file(stage_dir / "export/adapter/adapter_model.safetensors")
    assert len(adapter) == len(trained)
    for name, tensor in adapter.items():
        matches = [k for k in trained if k.replace(".modules_to_save", "").replace(".default", "")
                   .endswith(name.split("base_model.model.", 1)[-1])]
        assert len(matches) == 1 and torch.equal(trained[matches[0]], tensor), name


def test_stage2_starts_from_stage1_export(two_rank_run):
    config = yaml.safe_load((two_rank_run / "stage2/config.yaml").read_text())
    assert config["stage"]["init_from"].endswith("stage1/export-best") and config["stage"]["tasks"] == ["vqa"]
    assert json.loads((two_rank_run / "stage2/export/export.json").read_text())["stage"] == "stage2"


def test_tensorboard_holds_the_metrics(two_rank_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_rank_run / "stage1/tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/tflops_per_device", "perf/data_share", "mem/peak_rss_gib", "counters/skipped_steps",
                "counters/truncated_answers", "counters/dropped_samples"}
    assert expected <= tags
    steps = losses(two_rank_run / "stage1")
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert logged.keys() == steps.keys()
    assert all(abs(logged[s] - steps[s]) < 1e-5 for s in steps)
    figures = validations(two_rank_run / "stage1")
    for name in ("val/loss", "val/parse/all_rate", "val/strict/local/micro_avg_f1"):
        logged = {e.step: e.value for e in acc.Scalars(name)}
        assert logged == pytest.approx({s: f[name] for s, f in figures.items()}, abs=1e-6)
    assert {e.step for e in acc.Scalars("val/seconds")} == figures.keys()


def test_killed_run_resumes_with_identical_losses(recipes, two_rank_run):
    data = yaml.safe_load(recipes["stage1"].read_text())
    data["run"]["dir"] = str(recipes["root"] / "runs/killed")
    recipe = recipes["root"] / "killed.yaml"
    recipe.write_text(yaml.safe_dump(data))
    stage_dir = recipes["root"] / "runs/killed/stage1"
    proc = subprocess.Popen(command(recipe, 2), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # kill after the step-4 checkpoint, mid-epoch, before the end
            if (stage_dir / "metrics.jsonl").is_file() and len(losses(stage_dir)) >= 6:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    reference = losses(two_rank_run / "stage1")
    assert len(losses(stage_dir)) < len(reference)
    run(recipe, 2)
    resumed = losses(stage_dir)
    assert resumed.keys() == reference.keys()
    assert max(abs(resumed[s] - reference[s]) for s in reference) <= 1e-6
    # the same validations at the same steps, and the same best export
    reference_val, resumed_val = validations(two_rank_run / "stage1"), validations(stage_dir)
    assert resumed_val.keys() == reference_val.keys()
    assert all(resumed_val[s] == pytest.approx(reference_val[s], abs=1e-6) for s in reference_val)
    best = [json.loads((d / "export-best/export.json").read_text()) for d in (two_rank_run / "stage1", stage_dir)]
    assert (best[0]["step"], best[0]["best"]["figure"]) == (best[1]["step"], best[1]["best"]["figure"])
    assert best[0]["best"]["value"] == pytest.approx(best[1]["best"]["value"], abs=1e-6)


def test_preemption_signal_checkpoints_and_exits_for_requeue(recipes, two_rank_run):
    data = yaml.safe_load(recipes["stage1"].read_text())
    data["run"]["dir"] = str(recipes["root"] / "runs/preempted")
    data["eval"]["generate"] = 0  # validation's loss only: its generations are checked on the session's run
    data["checkpoint"]["save_every"] = 1000
    recipe = recipes["root"] / "preempted.yaml"
    recipe.write_text(yaml.safe_dump(data))
    stage_dir = recipes["root"] / "runs/preempted/stage1"
    proc = subprocess.Popen(command(recipe, 2), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not ((stage_dir / "metrics.jsonl").is_file() and losses(stage_dir)):
        time.sleep(0.02)
    # SLURM's --signal=USR1@<s> reaches the tasks; here only rank 1 gets it, and both ranks must stop together
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank=1" in p.cmdline() and "--local_rank=1" not in p.parent().cmdline()]  # not its loader
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out[-3000:]
    tag = (stage_dir / "checkpoints/latest").read_text().strip()
    assert f"checkpoint written at step {int(tag[4:])}" in out
    assert len(losses(stage_dir)) < len(losses(two_rank_run / "stage1"))
    run(recipe, 2)
    assert losses(stage_dir) == pytest.approx(losses(two_rank_run / "stage1"), abs=1e-6)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(recipes, two_rank_run):
    data = yaml.safe_load(recipes["stage1"].read_text())
    data["run"]["dir"] = str(recipes["root"] / "runs/nonfinite")
    data["eval"]["generate"] = 0  # validation's loss only: its generations are checked on the session's run
    data["train"].update(epochs=2, max_nonfinite=2)
    recipe = recipes["root"] / "nonfinite.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run(recipe, 1, flags=("--inject-nonfinite", "2"))
    rows = list(metric_rows(recipes["root"] / "runs/nonfinite/stage1", "loss").values())  # steps, in order
    assert rows[1]["loss"] != rows[1]["loss"] and rows[1]["skipped_microbatches"] > 0  # NaN, counted
    assert rows[-1]["loss"] == rows[-1]["loss"]  # and training went on
    data["run"]["dir"] = str(recipes["root"] / "runs/nonfinite2")
    recipe.write_text(yaml.safe_dump(data))
    done = run(recipe, 1, check=False, flags=("--inject-nonfinite", "2,3"))
    assert done.returncode == 3 and "2 optimizer steps in a row had a non-finite loss" in done.stderr


def test_resuming_with_another_world_size_is_refused(recipes, two_rank_run):
    done = run(recipes["stage1"], 1, "train.epochs=7", check=False)
    assert done.returncode == 2
    assert "written by 2 ranks, this run has 1" in done.stderr or "different recipe" in done.stderr


def test_resuming_on_re_prepared_shards_is_refused_naming_the_change(recipes, prepared, synth_root, two_rank_run):
    """Same recipe, same shard directory, re-prepared with another label policy: refused before anything is built."""
    from litegpt.data.policy import PolicyConfig
    from litegpt.data.prepare import PrepareConfig, prepare

    root = recipes["root"]
    shards = root / "redata-shards"
    shutil.copytree(prepared, shards)  # with its feature cache: the run below encodes nothing
    data = yaml.safe_load(recipes["stage1"].read_text())
    data["run"]["dir"] = str(root / "runs/redata")
    data["eval"]["generate"] = 0  # validation's loss only: its generations are checked on the session's run
    data["data"]["shards"] = str(shards)
    data["train"]["max_steps"] = 2
    recipe = root / "redata.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run(recipe, 1)
    before = (root / "runs/redata/stage1/metrics.jsonl").read_text()

    prepare(PrepareConfig(root=synth_root, out=root / "union-shards", samples_per_shard=8, workers=1,
                          policy=PolicyConfig("union")))
    shutil.rmtree(shards)
    (root / "union-shards").rename(shards)
    done = run(recipe, 1, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"train.py: {root}/runs/redata/stage1/checkpoints/step00000002 was trained on other data (the shards of split "
        "'train' differ: re-prepared with label_policy 'drop' -> 'union'): use a new run.dir, or --resume none to "
        "start over, or restore the data it was trained on to continue it"]
    assert (root / "runs/redata/stage1/metrics.jsonl").read_text() == before


def test_fp32_trains_a_model_whose_weights_ship_in_bf16(recipes, tiny_config, tmp_path):
    """The paper's LLM is bf16 (llm.dtype); `train.precision: fp32` (a CPU, a GPU without bf16) trains it in fp32
    instead of failing at the first step on mixed bf16/fp32 weights."""
    from safetensors.torch import load_file

    model = tmp_path / "model_bf16.yaml"
    data = json.loads(json.dumps(tiny_config.to_dict()))
    data["llm"]["dtype"] = "bfloat16"
    model.write_text(yaml.safe_dump(data))
    run(recipes["stage1"], 1, f"model={model}", f"run.dir={tmp_path / 'runs'}", "train.precision=fp32",
        "train.max_steps=2", "checkpoint.save_every=2")
    assert all(map(math.isfinite, losses(tmp_path / "runs/stage1").values()))
    projector = load_file(tmp_path / "runs/stage1/export/projector.safetensors")
    assert {t.dtype for t in projector.values() if t.is_floating_point()} == {torch.float32}


def test_bad_configs_are_one_clear_message(recipes, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(recipes["stage1"]), "--deepspeed", str(ds)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "train_micro_batch_size_per_gpu=16" in done.stderr
    done = subprocess.run(cmd[:-1] + [str(REPO / "ds_configs/zero2.json"), "--set", "train.micro_batch=0"],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "micro_batch" in done.stderr
    done = subprocess.run(cmd[:-1] + [str(REPO / "ds_configs/zero2.json"), "--set", "data.shards=/nonexistent"],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "/nonexistent" in done.stderr


def test_overrides_read_numbers_as_written():
    """`--set optim.lr=3e-3` is a float (YAML 1.1 alone reads it as a string); a non-number is refused."""
    from litegpt.model.config import ConfigError
    from litegpt.train.config import load_train_config

    recipe = REPO / "configs/tiny/stage1.yaml"
    cfg = load_train_config(recipe, ["optim.lr=3e-3", "optim.min_lr=1E-5", "optim.weight_decay=.5"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (3e-3, 1e-5, 0.5)
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_train_config(recipe, ["optim.lr=fast"])


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        bits = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        assert a.dtype == b.dtype and torch.equal(*bits), where
    else:
        assert a == b, where


def test_a_skipped_step_leaves_weights_optimizer_and_schedule_untouched(recipes):
    """Step 2 non-finite on 2 ranks (AdamW with momentum and weight decay): the checkpoint after it holds the
    trainable weights, the optimizer state of every rank and the LR schedule of the checkpoint before it, bit
    for bit. (Buffers, merge.norm's running statistics, are not weights: its forward passes update them.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    data = yaml.safe_load(recipes["stage1"].read_text())
    data["run"]["dir"] = str(recipes["root"] / "runs/skipped")
    data["eval"]["generate"] = 0  # validation's loss only: its generations are checked on the session's run
    recipe = recipes["root"] / "skipped.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run(recipe, 2, "train.grad_accum=2", "train.max_steps=3", "optim.weight_decay=0.1", "checkpoint.save_every=1",
        "checkpoint.keep_last=10", flags=("--inject-nonfinite", "2"))
    checkpoints = recipes["root"] / "runs/skipped/stage1/checkpoints"

    def saved(step: int) -> tuple[dict, list[dict], dict]:
        tag = f"step{step:08d}"
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag, exclude_frozen_parameters=True)
        optimizer = [{k: v for k, v in torch.load(checkpoints / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                                                  weights_only=False)["optimizer_state_dict"].items()
                      if k in ("base_optimizer_state", "single_partition_of_fp32_groups")} for rank in range(2)]
        model = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v for k, v in weights.items() if k not in model["buffer_names"]}, optimizer, model

    (w1, o1, m1), (w2, o2, m2), (w3, _, _) = saved(1), saved(2), saved(3)
    assert o1[0]["base_optimizer_state"]["state"]  # AdamW's moments are there to compare
    assert_identical(w2, w1, "weights")
    assert_identical(o2, o1, "optimizer")
    assert_identical(m2["lr_scheduler"], m1["lr_scheduler"], "lr_scheduler")  # the schedule does not advance
    assert (m1["skipped_steps"], m2["skipped_steps"]) == (0, 1)
    assert any(not torch.equal(w3[k], w2[k]) for k in w2)  # and step 3 trains again
