"""The paper model (configs/model_paper.yaml) at 2 decoder layers, end to end through the real entry points.

Every width, head count, the 32,000-token Llama-2 tokenizer, both full-size encoders, the frozen LayerNorm
merge, the 3840 -> 5632 -> 4096 projector, LoRA r 64 on q/v and the MiniGPT-v2 key map are the paper's;
only the decoder is 2 layers deep (`litegpt.model.reduced`). On 2 CPU ranks with ZeRO-2 in bf16 (the
paper recipe's precision): `litegpt cache-features`, stage 1 killed with SIGKILL after a checkpoint and
resumed, stage 2 from stage 1's export, `litegpt evaluate` and `litegpt predict` on a real DICOM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pydicom.data import get_testdata_file
from test_train import ENV, REPO, command, run

pytestmark = pytest.mark.slow
LAYERS = 2
PROJECTOR = 3840 * 5632 + 5632 + 5632 * 4096 + 4096  # 44,705,280 (paper: 3840 -> 5632 -> 4096)
LORA_PER_LAYER = 2 * (64 * 4096 + 4096 * 64)  # 1,048,576: q_proj and v_proj, each A [64, 4096] + B [4096, 64]
# (text, ids) from llama-tokenizer-js's own test suite and the Llama-2 chat prompt format
LLAMA2_IDS = {"grabbed": [1, 2646, 1327, 287], "ax\n####\nboo": [1, 4853, 13, 4136, 13, 833, 29877],
              "\n": [1, 29871, 13], "🦙": [1, 29871, 243, 162, 169, 156], "Hello world!": [1, 15043, 3186, 29991],
              "[INST]": [1, 518, 25580, 29962]}


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "litegpt.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"litegpt {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def metric_rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def paper_config(tmp_path_factory) -> Path:
    """The paper model at 2 layers with random weights and the real Llama-2 tokenizer (fetched with npm)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to fetch the Llama-2 tokenizer")
    from litegpt.model.reduced import derive_reduced

    return derive_reduced(REPO / "configs/model_paper.yaml", LAYERS, tmp_path_factory.mktemp("paper-weights"))


@pytest.fixture(scope="module")
def paper_run(paper_config, prepared, tmp_path_factory) -> Path:
    """cache-features, stage 1 (SIGKILLed after its step-2 checkpoint, then resumed), stage 2; the run dir."""
    cli("cache-features", "--shards", str(prepared), "--model", str(paper_config), "--workers", "1",
        "--batch-size", "8")
    root = tmp_path_factory.mktemp("paper-run")
    recipes = {}
    for name in ("stage1", "stage2"):  # the paper recipes; what changes is for CPU and a test's few steps
        data = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        data["model"] = str(paper_config)
        data["run"]["dir"] = str(root / "run")
        data["data"].update(shards=str(prepared), num_workers=1, shuffle_buffer=64)
        data["train"].update(micro_batch=1, max_steps=4 if name == "stage1" else 1, precision="bf16")
        data["optim"].update(lr=1e-3, warmup_lr=1e-3, min_lr=1e-3, warmup_steps=0)  # a loss that moves in 4 steps
        data["checkpoint"].update(save_every=2)
        data["log"]["every"] = 1
        if name == "stage2":
            data["stage"]["init_from"] = str(root / "run/stage1/export")
        recipes[name] = root / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(data))
    stage_dir = root / "run/stage1"
    log = root / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command(recipes["stage1"], 2), cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:  # kill after step 3 is logged: the step-2 checkpoint is there, step 3 will be trained again
        deadline = time.time() + 900
        while not ((stage_dir / "metrics.jsonl").is_file() and any(r["step"] == 3 for r in metric_rows(stage_dir))):
            assert proc.poll() is None, f"stage 1 ended ({proc.returncode}) before it could be killed:\n" + \
                log.read_text()[-3000:]
            assert time.time() < deadline, "stage 1 did not reach step 3"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (stage_dir / "export").exists()
    run(recipes["stage1"], 2, flags=("--resume", "auto"))
    run(recipes["stage2"], 2)
    return root / "run"


@pytest.fixture(scope="module")
def fresh(paper_config):
    """Builds the 2-layer paper model without encoders (bf16, as configured), MiniGPT-v2 init applied."""
    from litegpt.model.config import load_model_config
    from litegpt.model.model import build_model

    cfg = load_model_config(paper_config)
    return lambda: build_model(cfg, with_encoders=False).eval()


def test_the_derived_model_is_the_paper_but_for_its_depth(paper_config):
    from transformers import AutoTokenizer

    from litegpt.model.config import load_model_config, resolve_arch
    from litegpt.model.encoders import backbone_geometry

    paper, derived = load_model_config(REPO / "configs/model_paper.yaml"), load_model_config(paper_config)
    out = paper_config.parent
    assert derived.llm.source == str(out / "llm") and derived.minigpt_checkpoint == str(out / "minigpt_v2.pth")
    assert [e.source for e in derived.vision.encoders] == [str(out / e.name) for e in paper.vision.encoders]
    assert resolve_arch(derived.llm.arch, "llm") == {**resolve_arch(paper.llm.arch, "llm"), "num_hidden_layers": LAYERS}

    def without_sources(cfg) -> dict:
        data = cfg.to_dict()
        data["llm"].update(source=None, arch=None)
        data["minigpt_checkpoint"] = None
        for encoder in data["vision"]["encoders"]:
            encoder["source"] = None
        return data

    assert without_sources(derived) == without_sources(paper)
    assert backbone_geometry(derived.vision) == (196 + 49, 768)  # merge of 5: 49 x 3840
    # the real on-disk formats: open_clip local dir, a whole CLIPModel dir, a Llama dir
    assert json.loads((out / "biomedclip/open_clip_config.json").read_text())["model_cfg"]
    assert json.loads((out / "pubmedclip/config.json").read_text())["architectures"] == ["CLIPModel"]
    tokenizer = AutoTokenizer.from_pretrained(derived.llm.source)
    assert type(tokenizer).__name__ == "LlamaTokenizer" and len(tokenizer) == 32000
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for text, ids in LLAMA2_IDS.items():
        assert tokenizer(text).input_ids == ids, text


def test_trainable_counts_and_only_trainable_tensors_in_the_checkpoint(paper_run, paper_config):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from litegpt.model.config import load_model_config
    from litegpt.model.model import build_model

    with torch.device("meta"):
        model = build_model(load_model_config(paper_config), with_encoders=False)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for k, v in trainable.items() if k.startswith("projector.")) == PROJECTOR == 44_705_280
    lora = {k: v for k, v in trainable.items() if ".lora_" in k}
    for layer in range(LAYERS):
        prefix = f"llm.base_model.model.model.layers.{layer}.self_attn."
        assert {k[len(prefix):] for k in lora if k.startswith(prefix)} == {
            f"{m}_proj.lora_{ab}.default.weight" for m in "qv" for ab in "AB"}
        assert sum(v for k, v in lora.items() if k.startswith(prefix)) == LORA_PER_LAYER == 1_048_576
    assert sum(trainable.values()) == PROJECTOR + LAYERS * LORA_PER_LAYER
    for stage in ("stage1", "stage2"):
        checkpoints = paper_run / stage / "checkpoints"
        tag = (checkpoints / "latest").read_text().strip()
        module = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert {k: v.numel() for k, v in module.items()} == trainable
        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), exclude_frozen_parameters=True)
        assert {k: v.numel() for k, v in fp32.items()} == trainable


def test_killed_stage1_resumes_with_equal_losses_and_the_loss_falls(paper_run):
    rows = metric_rows(paper_run / "stage1")
    steps = [r["step"] for r in rows]
    assert steps[-2:] == [3, 4] and steps.count(3) == 2  # step 3 before the kill and again after the resume
    first, again = (r["loss"] for r in rows if r["step"] == 3)
    assert first == again
    loss = {r["step"]: r["loss"] for r in rows}
    assert all(v == v for v in loss.values())
    # from ln(32000) = 10.4 and above: lr 1e-3 moves a random model's output distribution within steps
    assert (loss[3] + loss[4]) / 2 < loss[1] - 2.0


def test_stage2_trains_from_stage1s_export_which_reloads_to_the_trained_logits(paper_run, fresh, prepared):
    from litegpt.features import open_cache
    from litegpt.grammar import Grammar
    from litegpt.model.config import Visual
    from litegpt.model.export import load_export

    config = yaml.safe_load((paper_run / "stage2/config.yaml").read_text())
    assert config["stage"]["init_from"] == str(paper_run / "stage1/export")
    info = json.loads((paper_run / "stage2/export/export.json").read_text())
    assert info["stage"] == "stage2"
    stage_dir = paper_run / "stage2"
    exported, trained = fresh(), fresh()
    cache = open_cache(prepared, exported.cfg.vision)
    keys, visual = [], []
    for key, _, features in cache.samples("test"):
        keys.append(key)
        visual.append(features)
        if len(keys) == 2:
            break
    batch = exported.inputs.generation_batch(keys, [Grammar.from_record(info).prompt("vqa")] * 2, visual, Visual.CACHE)

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.llm(inputs_embeds=model._embeds(batch), attention_mask=batch.attention_mask).logits

    initial = logits(exported)  # the MiniGPT-v2-format initialisation
    load_export(exported, stage_dir / "export")
    tag = (stage_dir / "checkpoints/latest").read_text().strip()
    module = torch.load(stage_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert not trained.load_state_dict(module, strict=False).unexpected_keys
    final = logits(exported)
    assert torch.isfinite(final).all() and not torch.equal(final, initial)
    assert torch.equal(final, logits(trained))


def test_evaluate_and_predict_run_on_the_trained_paper_shape(paper_run, prepared, tmp_path):
    out = tmp_path / "eval"
    cli("evaluate", "--run", str(paper_run / "stage2"), "--shards", str(prepared), "--limit", "2",
        "--batch-size", "2", "--max-new-tokens", "8", "--overlays", "1", "--out", str(out))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and json.loads((out / "metrics.json").read_text())["counts"]["images"] == 2
    dicom = Path(get_testdata_file("RG1_UNCR.dcm", download=False))
    done = cli("predict", str(dicom), "--run", str(paper_run / "stage2"), "--task", "both", "--max-new-tokens", "8",
               "--out", str(tmp_path / "overlay.png"))
    result = json.loads(done.stdout)
    assert set(result["text"]) == {"identify", "vqa"} and (tmp_path / "overlay.png").is_file()


def test_minigpt_checkpoint_initialises_projector_and_lora_through_the_key_map(paper_config, fresh):
    from litegpt.model.config import load_model_config

    state = torch.load(load_model_config(paper_config).minigpt_checkpoint, weights_only=True)["model"]
    model = fresh()
    named = dict(model.named_parameters())
    assert torch.equal(model.projector[2].weight, state["llama_proj.weight"].to(model.projector[2].weight.dtype))
    for layer in range(LAYERS):
        for module in ("q_proj", "v_proj"):
            for ab in ("A", "B"):
                ours = named[f"llm.base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.default.weight"]
                key = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight"
                assert torch.equal(ours, state[key].to(ours.dtype)), key  # PEFT keeps adapters in fp32
