"""`run.perturb_init`: the internal knob that stands in for another CPU's rounding when a trained model's
figures are checked for robustness (docs/BENCHMARKS.md, the demo). Checked on a real module: relative noise of
the asked size on trainable weights only, the same for the same seed (every rank draws it alike)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litegpt.model.config import ConfigError
from litegpt.train.config import load_train_config
from litegpt.train.launch import perturb


def module() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    net[0].requires_grad_(False)  # frozen, as the LLM's base weights are
    return net


def test_perturb_is_relative_seeded_and_leaves_frozen_weights():
    before, a, b, other = module(), module(), module(), module()
    for net, seed in ((a, 1), (b, 1), (other, 2)):
        perturb(net, 1e-3, seed)
    relative = []
    for name, p in before.named_parameters():
        q = dict(a.named_parameters())[name]
        if not p.requires_grad:
            assert torch.equal(p, q), name
            continue
        relative.append(((q - p) / p).flatten())
        assert torch.equal(q, dict(b.named_parameters())[name])
        assert not torch.equal(q, dict(other.named_parameters())[name])
    relative = torch.cat(relative).detach()  # 520 draws of N(0, 1e-3): mean within 7 of its standard errors
    assert 0.8e-3 < relative.std().item() < 1.2e-3 and abs(relative.mean().item()) < 3e-4


def test_perturb_init_is_off_by_default_and_refused_negative():
    recipe = "configs/tiny/stage2.yaml"
    assert load_train_config(recipe).run.perturb_init == 0
    assert load_train_config(recipe, ["run.perturb_init=1e-6", "run.perturb_seed=3"]).run.perturb_seed == 3
    with pytest.raises(ConfigError, match="run.perturb_init must be >= 0"):
        load_train_config(recipe, ["run.perturb_init=-1e-6"])
