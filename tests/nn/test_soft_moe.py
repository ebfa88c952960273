"""Soft MoE: weights are proper convex combinations, permutation equivariance, a hand example."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import MoEConfig
from moex.nn.moe import CausalSoftMoE, SoftMoE, soft_moe_weights
from moex.nn.sharding import unbox

CFG = MoEConfig(kind="soft", num_experts=3, expert_dim=16, soft_slots=2)


def init(module, x):
    return unbox(module.init(jax.random.key(0), x)["params"])


def test_dispatch_and_combine_sum_to_one():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    mu = jnp.asarray(rng.normal(size=(8, 3, 2)), jnp.float32)
    dispatch, combine = soft_moe_weights(x, mu, jnp.float32(2.0))
    np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, atol=1e-6)        # over tokens
    np.testing.assert_allclose(combine.sum(axis=(2, 3)), 1.0, atol=1e-6)    # over all slots
    mask = jnp.asarray([[True] * 5 + [False] * 2, [True] * 7])
    dispatch, _ = soft_moe_weights(x, mu, jnp.float32(2.0), mask)
    np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(dispatch[0, 5:], 0.0)                     # padding gets none


def test_permutation_equivariant_within_group():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    module = SoftMoE(CFG, "gelu", use_bias=True)
    params = init(module, x)
    y, _ = module.apply({"params": params}, x)
    perm = rng.permutation(6)
    y_perm, _ = module.apply({"params": params}, x[:, perm])
    np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-5)


def test_hand_computed_two_experts():
    # x0 = e1, x1 = e2; slot params mu_0 = e1, mu_1 = e2 (p = 1), scale 1: logits = I.
    # a = e/(e+1), b = 1/(e+1). Slots: s0 = a x0 + b x1 = [a, b], s1 = [b, a].
    # Experts (relu, identity up): expert 0 = I, expert 1 = 2 I -> outputs [a, b], [2b, 2a].
    # Combine per token is softmax over the two slots of its logits row: token 0 [a, b].
    # y0 = a [a, b] + b [2b, 2a] = [a^2 + 2b^2, 3ab];  y1 = [3ab, b^2 + 2a^2].
    cfg = MoEConfig(kind="soft", num_experts=2, expert_dim=2, soft_slots=1)
    eye = np.eye(2, dtype=np.float32)
    params = {"slots": jnp.asarray(eye[:, :, None]), "scale": jnp.float32(1.0),
              "experts": {"w_up": jnp.asarray(np.stack([eye, eye])),
                          "w_down": jnp.asarray(np.stack([eye, 2 * eye]))}}
    x = jnp.asarray(eye[None])
    y, _ = SoftMoE(cfg, "relu").apply({"params": params}, x)
    a, b = math.e / (math.e + 1), 1 / (math.e + 1)
    np.testing.assert_allclose(y[0], [[a * a + 2 * b * b, 3 * a * b],
                                      [3 * a * b, b * b + 2 * a * a]], atol=1e-5)


def test_causal_soft_is_per_token_mixture():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 5, 8)), jnp.float32)
    module = CausalSoftMoE(CFG, "swiglu")
    params = init(module, x)
    y, aux = module.apply({"params": params}, x)
    np.testing.assert_allclose(aux["gates"].sum(-1), 1.0, atol=1e-6)
    # Each token alone gives the same output: no mixing across tokens.
    for t in range(5):
        yt, _ = module.apply({"params": params}, x[:, t:t + 1])
        np.testing.assert_allclose(yt[0, 0], y[0, t], atol=1e-5)


def test_soft_gated_fast_path_equals_reference():
    from moex.nn.experts import experts_all, experts_soft_gated
    rng = np.random.default_rng(3)
    for activation, bias in (("swiglu", False), ("gelu", True)):
        e, d, f = 3, 6, 5
        p = {"w_up": rng.normal(size=(d, e, f)), "w_down": rng.normal(size=(e, f, 4))}
        if activation == "swiglu":
            p["w_gate"] = rng.normal(size=(d, e, f))
        if bias:
            p.update(b_up=rng.normal(size=(e, f)), b_down=rng.normal(size=(e, 4)))
        p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
        x = jnp.asarray(rng.normal(size=(7, d)), jnp.float32)
        g = jax.nn.softmax(jnp.asarray(rng.normal(size=(7, e)), jnp.float32))
        stacked = {k: v.transpose(1, 0, 2) if k in ("w_up", "w_gate") else v for k, v in p.items()}
        ref = jnp.einsum("ne,end->nd", g, experts_all(stacked, x, activation, shared_input=True))
        np.testing.assert_allclose(experts_soft_gated(p, x, g, activation), ref, atol=1e-5)
