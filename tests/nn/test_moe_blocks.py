"""Hard-MoE blocks: compute paths agree at module level; shared experts; layer selection; bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.config import MoEConfig, get_config
from moex.model import build, forward, init_params
from moex.nn.layers import MLP
from moex.nn.moe import DenseFFN, HardMoE, make_ffn
from moex.nn.sharding import unbox

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 16)), jnp.float32)


@pytest.mark.parametrize("shared_gate", ["none", "sigmoid"])
def test_shared_experts_added_to_routed_output(shared_gate):
    cfg = MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=8, renormalize=False,
                    num_shared_experts=2, shared_dim=8, shared_gate=shared_gate)
    block = HardMoE(cfg, "swiglu")
    params = unbox(block.init(jax.random.key(0), X)["params"])
    y, aux = block.apply({"params": params}, X)
    routed_only = dataclasses.replace(cfg, num_shared_experts=0)
    sub = {k: v for k, v in params.items() if k in ("router", "experts")}
    y_routed, _ = HardMoE(routed_only, "swiglu").apply({"params": sub}, X)
    shared = MLP(16, "swiglu").apply({"params": params["shared_experts"]}, X)
    if shared_gate == "sigmoid":
        shared = shared * jax.nn.sigmoid(X @ params["shared_gate"]["kernel"])
    np.testing.assert_allclose(y, y_routed + shared, atol=1e-5)
    assert aux["expert_ids"].shape == (2, 7, 2)


def test_every_compute_of_the_block_agrees():
    cfg = MoEConfig(kind="hard", num_experts=5, top_k=2, expert_dim=8)
    params = unbox(HardMoE(cfg, "gelu", use_bias=True).init(jax.random.key(1), X)["params"])
    mask = jnp.asarray([[True] * 7, [False] * 3 + [True] * 4])
    outs = [HardMoE(dataclasses.replace(cfg, compute=c, grouped_matmul=g), "gelu", use_bias=True)
            .apply({"params": params}, X, mask)[0]
            for c, g in (("auto", "blocked"), ("sorted", "blocked"), ("sorted", "ragged_dot"),
                         ("gather", "auto"), ("broadcast", "auto"), ("dense", "auto"))]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)


def test_make_ffn_follows_layer_selection():
    ds = get_config("deepseek-moe-16b").decoder.moe
    assert isinstance(make_ffn(ds, 0, 64, "swiglu", False, jnp.float32, jnp.float32,
                               causal=True), DenseFFN)
    assert isinstance(make_ffn(ds, 1, 64, "swiglu", False, jnp.float32, jnp.float32,
                               causal=True), HardMoE)


def test_bfloat16_model_runs_close_to_fp32():
    cfg = get_config("tiny-hard")
    params = init_params(cfg)
    bf = cfg.replace(dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 12)), jnp.int32)
    mask = jnp.ones_like(tokens)
    ref, _, _ = forward(build(cfg), params, tokens, mask)
    low, _, _ = forward(build(bf), params, tokens, mask)
    assert low.dtype == jnp.float32                     # logits are returned in fp32
    # bf16 keeps 8 mantissa bits: relative error per op ~ 2^-8; logits here are O(1).
    assert float(jnp.max(jnp.abs(low - ref))) < 0.1
