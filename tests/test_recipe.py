"""Recipe values that cannot work are refused when the recipe is read: one line naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from litegpt.model.config import ConfigError, load_model_config
from litegpt.train.config import deepspeed_config, load_recipe, load_train_config

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs/tiny/stage1.yaml"


@pytest.mark.parametrize("override, key", [
    ("data.length_group=0", "data.length_group"),  # hung: a length window of 0 batches never fills
    ("data.num_workers=-1", "data.num_workers"),
    ("data.shuffle_buffer=-4", "data.shuffle_buffer"),
    ("optim.min_lr=-1e-4", "optim.min_lr"),  # trained with a negative learning rate
    ("optim.warmup_lr=-1e-4", "optim.warmup_lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.weight_decay=-0.05", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.betas=[-0.1, 0.999]", "optim.betas"),
    ("log.every=0", "log.every"),
    ("log.peak_tflops=0", "log.peak_tflops"),
    ("train.max_nonfinite=0", "train.max_nonfinite"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.precision=fp16", "train.precision"),
    ("checkpoint.save_every=0", "checkpoint.save_every"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("run.seed=-1", "run.seed"),
    ("stage.tasks=[]", "stage.tasks"),
    ("stage.tasks=[caption]", "stage.tasks"),
])
def test_values_that_cannot_work_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as refused:
        load_train_config(RECIPE, [override])
    message = str(refused.value)
    assert message.startswith(f"{RECIPE}: {key} must be ") and "\n" not in message


@pytest.mark.parametrize("override", [
    "data.shuffle_buffer=0", "data.num_workers=0", "optim.min_lr=0", "optim.warmup_lr=0", "optim.warmup_steps=0",
    "optim.weight_decay=0", "optim.betas=[0, 0.999]", "train.max_steps=null", "train.max_nonfinite=1", "run.seed=0",
    "log.peak_tflops=989.5", "stage.tasks=[identify, vqa]"])
def test_the_edge_values_that_work_are_accepted(override):
    load_train_config(RECIPE, [override])


def test_every_shipped_recipe_is_accepted():
    for recipe in sorted((REPO / "configs").rglob("*.yaml")):
        if "model" not in yaml.safe_load(recipe.read_text()) or recipe.name.startswith("model_"):
            continue
        load_train_config(recipe)


@pytest.mark.parametrize("text, where", [
    ("run: {dir: runs/x, seed: 42\nstage: {name: stage1}\n", "line 3, column 6"),  # an unclosed flow mapping
    ("run:\n  dir: runs/x\n seed: 42\n", "line 4, column 2"),  # indentation
    ("optim: {lr: 1e-3}\noptim:\t{lr: 1e-4}\n", "line 3, column 7"),  # a tab
])
def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path, text, where):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(f"model: configs/model_tiny.yaml\n{text}")
    with pytest.raises(ConfigError) as refused:
        load_train_config(recipe)
    message = str(refused.value)
    assert message.startswith(f"{recipe}: not valid YAML at {where}: ") and "\n" not in message
    model = tmp_path / "model.yaml"
    model.write_text("vision: [\n")
    with pytest.raises(ConfigError, match=rf"^{model}: not valid YAML at line 2, column 1: "):
        load_model_config(model)
    with pytest.raises(ConfigError, match=r"^--set optim.betas=\[0.9, 0.99: not valid YAML"):
        load_train_config(RECIPE, ["optim.betas=[0.9, 0.99"])


def test_load_recipe_refuses_before_reading_the_data(tmp_path):
    """The recipe is checked first: a bad value is named even where the shards do not exist."""
    with pytest.raises(ConfigError, match="data.length_group must be >= 1, got 0"):
        load_recipe(RECIPE, ["data.length_group=0", "data.shards=/nonexistent"], REPO / "ds_configs/zero2.json", 1)


def test_train_py_refuses_a_yaml_syntax_error_with_exit_2_and_one_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: configs/model_tiny.yaml\nrun: {dir: runs/x, seed: 42\n")
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(recipe), "--deepspeed",
                           str(REPO / "ds_configs/zero2.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"train.py: {recipe}: not valid YAML at line 3, column 1: "
                                        "expected ',' or '}', but got '<stream end>'"]


@pytest.mark.parametrize("section, key", [("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")])
def test_a_deepspeed_config_that_would_apply_non_finite_steps_is_refused(section, key):
    """Skipped steps rely on DeepSpeed's overflow path (issue 12): a JSON turning it off is refused up front."""
    import json

    ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds.setdefault(section, {})[key] = False
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        deepspeed_config(ds, load_train_config(RECIPE), 1, bf16=False)
