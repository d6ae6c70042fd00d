"""MiniGPT-v2 stage-3 import, with a checkpoint written here under the real key names at tiny shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from litegpt.model.minigpt import MiniGPTImportError, import_minigpt
from litegpt.model.model import build_model

LAYERS, HIDDEN, PROJ_HIDDEN = 4, 128, 128  # configs/model_tiny.yaml
R = 8  # the LoRA MiniGPT-v2 saves: r on q_proj and v_proj (the tiny preset's own LoRA is wider; see qv_config)


def minigpt_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The keys MiniGPT-v2 saves (only trainable weights; PEFT names without `.default`), fp16 as saved."""
    g = torch.Generator().manual_seed(seed)
    state = {"llama_proj.weight": torch.randn(HIDDEN, PROJ_HIDDEN, generator=g).half(),
             "llama_proj.bias": torch.randn(HIDDEN, generator=g).half()}
    for i in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            prefix = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(R, HIDDEN, generator=g).half()
            state[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, R, generator=g).half()
    return state


@pytest.fixture
def qv_config(tiny_config):
    """The tiny preset with the paper's LoRA layout (q_proj and v_proj only, no modules_to_save) at rank R."""
    lora = dataclasses.replace(tiny_config.lora, r=R, target_modules=("q_proj", "v_proj"), modules_to_save=())
    return dataclasses.replace(tiny_config, lora=lora)


@pytest.fixture
def model(qv_config):
    return build_model(qv_config, with_encoders=False)


def _save(path, state):
    torch.save({"model": state, "optimizer": {}, "epoch": 4, "config": {"run": {"task": "image_text_pretrain"}}}, path)
    return path


def test_import_any_file_name(model, tmp_path):
    state = minigpt_state()
    path = _save(tmp_path / "my-minigptv2-stage3.pth", state)
    projector_first = model.projector[0].weight.detach().clone()
    loaded = import_minigpt(model, path)
    assert len(loaded) == 2 + LAYERS * 2 * 2
    params = dict(model.named_parameters())
    assert torch.equal(model.projector[2].weight, state["llama_proj.weight"].float())
    assert torch.equal(model.projector[2].bias, state["llama_proj.bias"].float())
    assert torch.equal(model.projector[0].weight, projector_first)  # only the last layer comes from MiniGPT-v2
    for i in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            ours = f"llm.base_model.model.model.layers.{i}.self_attn.{proj}"
            theirs = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            assert torch.equal(params[f"{ours}.lora_A.default.weight"], state[f"{theirs}.lora_A.weight"].float())
            assert torch.equal(params[f"{ours}.lora_B.default.weight"], state[f"{theirs}.lora_B.weight"].float())


def test_import_through_the_model_config(qv_config, tmp_path):
    state = minigpt_state(1)
    path = _save(tmp_path / "checkpoint.bin", state)
    model = build_model(dataclasses.replace(qv_config, minigpt_checkpoint=str(path)), with_encoders=False)
    assert torch.equal(model.projector[2].bias, state["llama_proj.bias"].float())


def test_new_peft_names_accepted(model, tmp_path):
    state = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in minigpt_state().items()}
    assert len(import_minigpt(model, _save(tmp_path / "x.pth", state))) == len(state)


def test_missing_key_is_named_and_nothing_changes(model, tmp_path):
    state = minigpt_state()
    del state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    before = model.projector[2].weight.detach().clone()
    with pytest.raises(MiniGPTImportError, match=r"1 missing:\n\s+llama_model\.base_model\.model\.model\.layers\.1"
                                                 r"\.self_attn\.v_proj\.lora_B\.weight"):
        import_minigpt(model, _save(tmp_path / "a.pth", state))
    assert torch.equal(model.projector[2].weight, before)


def test_misshaped_key_is_named(model, tmp_path):
    state = minigpt_state()
    state["llama_proj.weight"] = torch.zeros(HIDDEN, 5632)  # the real MiniGPT-v2 width into a tiny projector
    shapes = rf"checkpoint \({HIDDEN}, 5632\), model \({HIDDEN}, {PROJ_HIDDEN}\)"
    with pytest.raises(MiniGPTImportError, match=rf"llama_proj\.weight: {shapes}"):
        import_minigpt(model, _save(tmp_path / "b.pth", state))


def test_other_lora_rank_is_refused(qv_config, tmp_path):
    model = build_model(dataclasses.replace(qv_config, lora=dataclasses.replace(qv_config.lora, r=4)),
                        with_encoders=False)
    with pytest.raises(MiniGPTImportError, match=f"{LAYERS * 2 * 2} misshaped"):
        import_minigpt(model, _save(tmp_path / "c.pth", minigpt_state()))


def test_unmapped_key_is_refused(model, tmp_path):
    state = minigpt_state()
    state["llama_model.base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(R, HIDDEN)
    with pytest.raises(MiniGPTImportError, match=r"1 without a target.*\n.*k_proj\.lora_A"):
        import_minigpt(model, _save(tmp_path / "d.pth", state))


def test_missing_file(model, tmp_path):
    with pytest.raises(MiniGPTImportError, match="does not exist"):
        import_minigpt(model, tmp_path / "checkpoint_stage3.pth")
