"""Encoder registry: preprocessing, geometry, real-format round trips, config-only encoders, freezing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from litegpt.model.config import ConfigError, EncoderConfig, VisionConfig, load_model_config
from litegpt.model.encoders import (
    ENCODER_LOADERS,
    FrozenEncoder,
    ImagePreprocessor,
    Preprocess,
    VisualBackbone,
    backbone_geometry,
    build_raw_encoder,
    encoder_geometry,
)
from litegpt.model.tiny import write_encoder


def _image(h=70, w=90, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8), "L")


def test_preprocess_matches_torchvision():
    import torchvision.transforms as T

    cfg = EncoderConfig(name="e", kind="hf_clip", image_size=32)
    reference = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(cfg.mean, cfg.std)])
    image = _image()
    expected = reference(image.convert("RGB"))
    got = Preprocess(cfg)(image)
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_preprocess_shared_only_when_identical():
    a = EncoderConfig(name="a", kind="hf_clip", image_size=32)
    b = dataclasses.replace(a, name="b")
    c = dataclasses.replace(a, name="c", interpolation="bilinear")
    out = ImagePreprocessor(VisionConfig(encoders=(a, b, c)))(_image())
    assert out["a"] is out["b"] and not torch.equal(out["a"], out["c"])


def test_paper_geometry_on_meta():
    cfg = load_model_config("configs/model_paper.yaml")
    biomed, pubmed = cfg.vision.encoders
    assert encoder_geometry(biomed) == (224 // 16 * (224 // 16), 768)
    assert encoder_geometry(pubmed) == ((224 // 32) ** 2, 768)
    assert backbone_geometry(cfg.vision) == (245, 768)


def test_open_clip_round_trip(tiny_config):
    """Our loader reads the open_clip dir; its tokens equal a timm trunk loaded independently from the file."""
    import timm

    enc = tiny_config.vision.encoders[0]
    module, _ = build_raw_encoder(enc)
    state = torch.load(f"{enc.source}/open_clip_pytorch_model.bin", weights_only=True)
    assert "visual.head.proj.weight" in state  # the real format carries the (unused) projection head
    trunk = timm.create_model("vit_base_patch16_224", num_classes=0, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
    trunk.load_state_dict({k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")})
    trunk.eval()
    pixels = torch.randn(2, 3, 224, 224)
    got = FrozenEncoder(enc, module)(pixels)
    torch.testing.assert_close(got, trunk.forward_features(pixels)[:, 1:].detach())
    assert got.shape == (2, 196, 64)


def test_hf_clip_round_trip(tiny_config):
    from transformers import CLIPModel

    enc = tiny_config.vision.encoders[1]
    module, _ = build_raw_encoder(enc)
    full = CLIPModel.from_pretrained(enc.source).eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(FrozenEncoder(enc, module)(pixels), expected)


def test_open_clip_bad_weights_named(tiny_config, tmp_path):
    import shutil

    enc = tiny_config.vision.encoders[0]
    broken = tmp_path / "broken"
    shutil.copytree(enc.source, broken)
    state = torch.load(broken / "open_clip_pytorch_model.bin", weights_only=True)
    del state["visual.trunk.blocks.1.mlp.fc2.weight"]
    state["visual.trunk.pos_embed"] = torch.zeros(1, 10, 64)
    torch.save(state, broken / "open_clip_pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"missing: blocks\.1\.mlp\.fc2\.weight.*misshaped: pos_embed"):
        build_raw_encoder(dataclasses.replace(enc, source=str(broken)))


def test_missing_local_source_says_how_to_build():
    enc = EncoderConfig(name="x", kind="hf_clip", source="./nowhere/x")
    with pytest.raises(ConfigError, match="litegpt tiny-weights"):
        build_raw_encoder(enc)


def test_encoders_by_configuration_alone(tmp_path):
    """A timm and a transformers encoder added by config: saved, loaded back, concatenated with others."""
    timm_enc = EncoderConfig(name="deit", kind="timm", source=str(tmp_path / "deit"), image_size=64,
                             arch={"model_name": "deit_tiny_patch16_224",
                                   "kwargs": {"img_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2}})
    hf_enc = EncoderConfig(name="vit", kind="hf", source=str(tmp_path / "vit"), image_size=64, drop_prefix_tokens=1,
                           arch={"model_type": "vit", "image_size": 64, "patch_size": 32, "hidden_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64})
    for enc in (timm_enc, hf_enc):
        write_encoder(enc, tmp_path / enc.name)
    vision = VisionConfig(encoders=(timm_enc, hf_enc), dtype="float32")
    assert backbone_geometry(vision) == (16 + 4, 32)
    backbone = VisualBackbone(vision)
    feats = backbone({k: v.unsqueeze(0) for k, v in backbone.preprocess(_image()).items()})
    assert feats["deit"].shape == (1, 16, 32) and feats["vit"].shape == (1, 4, 32)
    assert feats["vit"].dtype == torch.float16  # rounded to the feature dtype
    # the transformers one equals AutoModel's own output
    from transformers import AutoModel
    ref = AutoModel.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        expected = ref(pixel_values=backbone.preprocess(_image())["vit"].unsqueeze(0)).last_hidden_state[:, 1:]
    torch.testing.assert_close(feats["vit"], expected.half())
    wide = dataclasses.replace(hf_enc, name="wide", source=None, arch={**hf_enc.arch, "hidden_size": 48})
    with pytest.raises(ConfigError, match="widths differ"):
        backbone_geometry(VisionConfig(encoders=(timm_enc, wide)))


def test_hf_kind_needs_prefix_count():
    enc = EncoderConfig(name="vit", kind="hf", image_size=64, arch={"model_type": "vit", "image_size": 64,
                        "patch_size": 32, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64})
    with pytest.raises(ConfigError, match="drop_prefix_tokens"):
        encoder_geometry(enc)


def test_wrong_image_size_is_a_config_error(tiny_config):
    enc = dataclasses.replace(tiny_config.vision.encoders[1], image_size=200)
    with pytest.raises(ConfigError, match="200x200"):
        encoder_geometry(enc)


def test_unknown_kind():
    with pytest.raises(ConfigError, match="unknown kind"):
        encoder_geometry(EncoderConfig(name="x", kind="nope"))
    assert set(ENCODER_LOADERS) == {"open_clip", "hf_clip", "timm", "hf"}


def test_frozen_and_in_eval_mode(tiny_model):
    vision = tiny_model.vision
    assert all(not p.requires_grad for p in vision.parameters())
    tiny_model.train()
    try:
        assert not any(m.training for enc in vision.encoders.values() for m in enc.modules())
    finally:
        tiny_model.eval()
    assert vision.encoders["biomedclip"].model.patch_embed.proj.weight.dtype == torch.float32


def test_layer_selection(tiny_config):
    """`layer: 0` takes the first block's output (before the final norm), not the final features."""
    enc = tiny_config.vision.encoders[0]
    module, _ = build_raw_encoder(enc)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        x = module.patch_embed(pixels)
        x = module.norm_pre(module._pos_embed(x))
        expected = module.blocks[0](x)[:, 1:]
    got = FrozenEncoder(dataclasses.replace(enc, layer=0), module)(pixels)
    torch.testing.assert_close(got, expected)


def test_tiny_encoder_files_are_reproducible(tiny_config, tmp_path):
    """Same config, same bytes: the feature cache fingerprint hashes these files."""
    for enc in tiny_config.vision.encoders:
        written = []
        for attempt in ("a", "b"):
            torch.randn(3)  # the global generator moves between the two writes
            write_encoder(enc, tmp_path / attempt / enc.name)
            written.append({p.name: p.read_bytes() for p in sorted((tmp_path / attempt / enc.name).iterdir())})
        assert written[0] == written[1] and written[0]
