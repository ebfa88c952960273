"""The projector as an MoE (hard or soft) maps vision width to decoder width."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from moex.config import MoEConfig, get_config
from moex.model import build, forward, init_params
from tests.helpers import image_prompts, random_images


@pytest.mark.parametrize("moe", [MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=32),
                                 MoEConfig(kind="soft", num_experts=4, expert_dim=32,
                                           soft_slots=4)])
def test_moe_projector(moe):
    base = get_config("tiny-dense")
    cfg = base.replace(projector=dataclasses.replace(base.projector, moe=moe))
    params = init_params(cfg)
    assert params["projector"]["ffn"]["experts"]["w_down"].shape == (4, 32, cfg.decoder.d_model)
    tokens, mask = image_prompts(cfg, [3, 5])
    logits, _, aux = forward(build(cfg), params, tokens, mask, random_images(cfg, 2))
    assert logits.shape[:2] == tokens.shape and bool(jnp.isfinite(logits).all())
    assert len(aux["vision"]) == 1 + (cfg.vision.num_layers - 1)   # projector + blocks used
    # the image changes the logits after the placeholders
    other, _, _ = forward(build(cfg), params, tokens, mask, random_images(cfg, 2, seed=3))
    assert not np.allclose(other, logits, atol=1e-4)
