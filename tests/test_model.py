"""The model: parameter counts on the meta device, merge, input assembly, loss, truncation, generation."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from litegpt.grammar import IMAGE_PLACEHOLDER, Grammar
from litegpt.labels import VINDR_CXR
from litegpt.model.config import ConfigError, Visual, load_model_config
from litegpt.model.inputs import IGNORE_INDEX, InputBuilder, TrainSample
from litegpt.model.model import TokenMerge, build_llm, choose_attention
from litegpt.model.summary import meta_model, summary_lines

VINDR = Grammar(VINDR_CXR)

SAMPLE = {"image_id": "x", "findings": [{"label": "Cardiomegaly", "box": [0.38, 0.49, 0.82, 0.63]},
                                        {"label": "Aortic enlargement", "box": [0.53, 0.28, 0.65, 0.36]}],
          "diagnoses": ["Lung tumor", "Pneumonia"]}


def _counts(module):
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


def test_paper_trainable_count_on_meta():
    model = meta_model(load_model_config("configs/model_paper.yaml"))
    projector = (3840 * 5632 + 5632) + (5632 * 4096 + 4096)
    lora = 32 * 2 * (4096 * 64 + 64 * 4096)
    assert (projector, lora) == (44_705_280, 33_554_432)
    assert _counts(model.projector) == (projector, 0)
    assert _counts(model.llm)[0] == lora
    assert _counts(model)[0] == projector + lora == 78_259_712
    assert _counts(model.vision) == (0, 85_798_656 + 87_456_000)  # timm ViT-B/16 trunk + CLIP ViT-B/32 vision
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.image_tokens == 49
    assert summary_lines(model, 1)[-1].startswith("trainable parameters: 78,259,712")


def test_tiny_trainable_count_on_meta(tiny_config):
    model = meta_model(tiny_config)
    projector = (64 * 5 * 128 + 128) + (128 * 128 + 128)
    # r 16 on q, k, v, o (128 -> 128), gate, up (128 -> 256) and down (256 -> 128), in 4 layers
    lora = 4 * (4 * (128 * 16 + 16 * 128) + 3 * (128 * 16 + 16 * 256))
    embeddings_and_head = 2 * 1024 * 128  # modules_to_save: trained in full
    assert _counts(model)[0] == projector + lora + embeddings_and_head


def test_model_summary_cli(capsys):
    from litegpt.cli import main

    assert main(["model-summary", "--config", "configs/model_paper.yaml", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "78,259,712" in out and "projector (Projector)" in out


def test_merge_k_must_divide_tokens(tiny_config):
    with pytest.raises(ConfigError, match="merge.k = 4 does not divide the 245 visual tokens"):
        meta_model(dataclasses.replace(tiny_config, merge=dataclasses.replace(tiny_config.merge, k=4)))


def test_token_merge_is_layernorm_then_adjacent_concat():
    merge = TokenMerge(10, 3, 5, "frozen")
    assert not list(merge.parameters())
    x = torch.randn(2, 10, 3)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    out = merge(x)
    assert out.shape == (2, 2, 15)
    torch.testing.assert_close(out[1, 1], torch.cat([normed[1, i] for i in range(5, 10)]), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in TokenMerge(10, 3, 5, "learnable").parameters()) == 6


def test_token_merge_batch_norm_standardises_each_position_and_channel():
    merge = TokenMerge(10, 3, 5, "batch")
    assert not list(merge.parameters())
    x = torch.randn(4, 10, 3) * torch.arange(1, 31).view(10, 3) + torch.randn(10, 3) * 100  # shared offset
    normed = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(merge(x)[2, 1], torch.cat([normed[2, i] for i in range(5, 10)]), atol=1e-4, rtol=0)
    merge.eval()  # the running statistics, from that one batch (momentum 0.1 from mean 0, variance 1)
    mean, var = 0.1 * x.mean(0), 0.9 + 0.1 * x.var(0, unbiased=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(merge(x)[0, 0], torch.cat([expected[0, i] for i in range(5)]), atol=1e-4, rtol=1e-5)
    merge.train()
    with pytest.raises(ValueError, match="at least 2 samples"):
        merge(x[:1])


def _samples(model, n=2, answer=None):
    pixels = {name: torch.randn(3, 224, 224) for name in model.encoder_names}
    tasks = ["identify", "vqa"]
    return [TrainSample(f"k{i}", VINDR.prompt(tasks[i % 2]),
                        answer or VINDR.answer(tasks[i % 2], SAMPLE), pixels, Visual.LIVE) for i in range(n)]


def test_input_assembly(tiny_model):
    tok = tiny_model.tokenizer
    samples = _samples(tiny_model)
    batch = tiny_model.inputs.train_batch(samples)
    assert (batch.input_ids[:, 0] == tok.bos_token_id).all()
    assert int((batch.input_ids == tok.bos_token_id).sum()) == 2  # one BOS per sample
    for row in range(2):
        slots = batch.image_mask[row].nonzero().flatten()
        assert len(slots) == 49 and int(slots[-1] - slots[0]) == 48  # contiguous, in place of <ImageHere>
        before = tok.decode(batch.input_ids[row, 1:int(slots[0])])
        assert before == "[INST] <Img>"
        answer_ids = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert answer_ids[-1] == tok.eos_token_id
        assert tok.decode(answer_ids[:-1]) == samples[row].answer
        n = int(batch.attention_mask[row].sum())
        assert batch.attention_mask[row, :n].all()  # right padding
        prompt_text = tok.decode(batch.input_ids[row, int(slots[-1]) + 1:n - len(answer_ids)])
        assert prompt_text == samples[row].prompt.split(IMAGE_PLACEHOLDER)[1].strip()
    gen = tiny_model.inputs.generation_batch(["a", "b"], [s.prompt for s in samples],
                                             [s.visual for s in samples], Visual.LIVE)
    assert gen.labels is None and gen.attention_mask[:, -1].all()  # left padding
    lengths = gen.attention_mask.sum(1)
    shorter = int(lengths.argmin())
    assert int(lengths[shorter]) < gen.attention_mask.shape[1] and gen.attention_mask[shorter, 0] == 0


def test_a_batch_moves_every_tensor_and_keeps_its_bookkeeping(tiny_model):
    """`Batch.to` / `pin_memory` (the loader pins on a GPU) map every tensor and carry the rest unchanged."""
    batch = tiny_model.inputs.train_batch(_samples(tiny_model))
    seen = []
    moved = batch._map(lambda t: seen.append(t) or t.to(torch.float64))
    assert len(seen) == 4 + len(batch.visual)  # input_ids, image_mask, attention_mask, labels, each encoder's
    assert all(t.dtype == torch.float64 for t in [moved.input_ids, moved.labels, *moved.visual.values()])
    same = batch.to("cpu", non_blocking=True)
    for a, b in ((same.input_ids, batch.input_ids), (same.labels, batch.labels), (same.image_mask, batch.image_mask)):
        assert torch.equal(a, b)
    assert (same.keys, same.source, same.truncated, same.dropped) == (batch.keys, batch.source, batch.truncated,
                                                                     batch.dropped)


def test_loss_is_mean_cross_entropy_over_answer_tokens(tiny_model):
    batch = tiny_model.inputs.train_batch(_samples(tiny_model))
    with torch.no_grad():
        out = tiny_model(batch)
        embeds = tiny_model._embeds(batch)
        logits = tiny_model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


def test_truncation_is_counted_never_silent(tiny_model):
    tok = tiny_model.tokenizer
    prompt = VINDR.prompt("identify")
    answer = VINDR.answer("identify", SAMPLE)
    prompt_len = 1 + 49 + len(tok(prompt.replace(IMAGE_PLACEHOLDER, "|").split("|")[0],
                                  add_special_tokens=False)["input_ids"])
    prompt_len += len(tok(prompt.split(IMAGE_PLACEHOLDER)[1], add_special_tokens=False)["input_ids"])
    answer_len = len(tok(answer, add_special_tokens=False)["input_ids"]) + 1
    pixels = {name: torch.zeros(3, 224, 224) for name in tiny_model.encoder_names}
    samples = [TrainSample("long", prompt, answer, pixels, Visual.LIVE), TrainSample("short", prompt, "COPD.", pixels, Visual.LIVE)]

    capped = InputBuilder(tok, 49, max_length=10_000, max_answer_tokens=5).train_batch(samples)
    assert capped.truncated == 1 and capped.dropped == []
    assert int((capped.labels[0] != IGNORE_INDEX).sum()) == 5

    fits = InputBuilder(tok, 49, max_length=prompt_len + answer_len, max_answer_tokens=10_000).train_batch(samples)
    assert fits.truncated == 0

    tight = InputBuilder(tok, 49, max_length=prompt_len, max_answer_tokens=10_000)
    with pytest.raises(ConfigError, match="max_length"):
        tight.train_batch(samples)  # every sample loses its whole answer: a configuration error

    other = TrainSample("other", "[INST] <Img><ImageHere></Img> hi [/INST]", "COPD.", pixels, Visual.LIVE)
    mixed = InputBuilder(tok, 49, max_length=prompt_len, max_answer_tokens=10_000).train_batch(samples + [other])
    assert mixed.dropped == ["long", "short"] and mixed.keys == ["other"]
    assert mixed.visual["biomedclip"].shape[0] == 1


def test_prompt_needs_one_placeholder(tiny_model):
    pixels = {name: torch.zeros(3, 224, 224) for name in tiny_model.encoder_names}
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model.inputs.train_batch([TrainSample("k", "[INST] no image [/INST]", "x", pixels, Visual.LIVE)])


def test_generation_probabilities_match_a_forward_pass(tiny_model):
    samples = _samples(tiny_model)
    batch = tiny_model.inputs.generation_batch(["a", "b"], [s.prompt for s in samples],
                                               [s.visual for s in samples], Visual.LIVE)
    gens = tiny_model.generate(batch, max_new_tokens=6)
    single = tiny_model.generate(tiny_model.inputs.generation_batch(["b"], [samples[1].prompt],
                                                                    [samples[1].visual], Visual.LIVE), max_new_tokens=6)
    assert single[0].token_ids == gens[1].token_ids  # left padding does not change the result
    torch.testing.assert_close(torch.tensor(single[0].probs), torch.tensor(gens[1].probs), atol=1e-5, rtol=0)
    # teacher-forced forward over prompt + generated tokens gives the same probabilities
    one = tiny_model.inputs.generation_batch(["a"], [samples[0].prompt], [samples[0].visual], Visual.LIVE)
    ids = gens[0].token_ids
    with torch.no_grad():
        prompt_embeds = tiny_model._embeds(one)
        new = tiny_model.llm.get_input_embeddings()(torch.tensor([ids]))
        logits = tiny_model.llm(inputs_embeds=torch.cat([prompt_embeds, new], 1)).logits[0]
    probs = logits.softmax(-1)[one.input_ids.shape[1] - 1:-1]
    expected = probs[torch.arange(len(ids)), torch.tensor(ids)]
    assert len(ids) == len(gens[0].probs) == len(gens[0].tokens)
    torch.testing.assert_close(torch.tensor(gens[0].probs), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(logits[one.input_ids.shape[1] - 1:-1].argmax(-1), torch.tensor(ids))  # greedy
    assert gens[0].text == tiny_model.tokenizer.decode(ids, skip_special_tokens=True)


def test_attention_falls_back_to_sdpa_on_cpu(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="litegpt.model.model"):
        assert choose_attention("auto") == "sdpa"
    assert "attention implementation: sdpa" in caplog.text
    assert tiny_model.llm.config._attn_implementation == "sdpa"


def test_explicit_flash_attention_without_the_package_fails(tiny_config):
    pytest.importorskip("transformers")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError):
        build_llm(dataclasses.replace(tiny_config.llm, attn_implementation="flash_attention_2"), None)


def test_eight_bit_needs_bitsandbytes(tiny_config):
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ConfigError, match="bitsandbytes"):
        build_llm(dataclasses.replace(tiny_config.llm, load_in_8bit=True), None)


def test_training_step_changes_only_trainable_parameters(tiny_config):
    from litegpt.model.model import build_model

    model = build_model(tiny_config, with_encoders=False)
    assert model.vision is None
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("projector.") for n in trainable)
    assert not any("q_proj.base_layer" in n for n in trainable)
    batch = model.inputs.train_batch([  # two samples: the tiny preset's merge.norm is a BatchNorm
        TrainSample(key, VINDR.prompt("vqa"), "COPD.",
                    {"biomedclip": torch.randn(196, 64).half(), "pubmedclip": torch.randn(49, 64).half()}, Visual.CACHE)
        for key in ("a", "b")])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(dict(model.named_parameters())["projector.0.weight"], trainable["projector.0.weight"])
    with pytest.raises(ValueError, match="without encoders"):
        model.image_embeddings({n: torch.zeros(1, 3, 224, 224) for n in model.encoder_names}, Visual.LIVE)


def test_config_errors_name_the_key(tmp_path):
    load = load_model_config
    data = yaml.safe_load(open("configs/model_tiny.yaml"))
    data["llm"]["max_lenght"] = 12
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"a\.yaml\.llm: unknown key\(s\) max_lenght"):
        load(tmp_path / "a.yaml")
    data["llm"].pop("max_lenght")
    data["vision"]["encoders"][0]["mean"] = [0.5, 0.5]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"vision\.encoders\[0\]\.mean: expected 3 values"):
        load(tmp_path / "b.yaml")
    data["vision"]["encoders"][0]["mean"] = [0.5, 0.5, 0.5]
    data["llm"]["dtype"] = "fp8"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="llm.dtype"):
        load(tmp_path / "c.yaml")


def test_tiny_weights_are_deterministic_and_reload(tiny_config, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from litegpt.cli import main
    from litegpt.model.tiny import build_weights

    other = dataclasses.replace(tiny_config, llm=dataclasses.replace(tiny_config.llm, source=str(tmp_path / "llm")))
    assert build_weights(other) == [tmp_path / "llm"]  # the encoders exist already: kept
    a, b = load_file(f"{tiny_config.llm.source}/model.safetensors"), load_file(tmp_path / "llm" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "llm" / "tokenizer.json").read_bytes() == \
        (Path(tiny_config.llm.source) / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "llm")
    text = VINDR.answer("identify", SAMPLE) + " ünïcode"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte fallback round trip
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= tiny_config.llm.arch["vocab_size"]
    assert not list(tmp_path.glob(".*tmp*"))
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(other.to_dict()))))
    assert main(["tiny-weights", "--config", str(config)]) == 0  # nothing left to write
