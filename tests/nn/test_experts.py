"""The expert computes agree: sorted pairs (ragged_dot and blocked kernels) == gathered pairs ==
broadcast pairs == dense one-hot einsum == plain loop over experts."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import pytest

from moex.nn.experts import (BROADCAST_TOKENS, COMPUTE, experts_loop, experts_routed,
                             resolve_compute)
from moex.nn.routing import route


def make_params(rng, e, d, f, activation, bias, out=None):
    out = out or d
    p = {"w_up": rng.normal(size=(e, d, f)) / np.sqrt(d),
         "w_down": rng.normal(size=(e, f, out)) / np.sqrt(f)}
    if activation == "swiglu":
        p["w_gate"] = rng.normal(size=(e, d, f)) / np.sqrt(d)
    if bias:
        p["b_up"] = rng.normal(size=(e, f))
        p["b_down"] = rng.normal(size=(e, out))
        if activation == "swiglu":
            p["b_gate"] = rng.normal(size=(e, f))
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def check_every_compute(x, routing, params, activation):
    loop = experts_loop(params, x, routing, activation)
    # the kernel matters to the sorted route only (and to which route 'auto' picks)
    for compute, grouped_matmul in [(c, "blocked") for c in COMPUTE] + [("sorted", "ragged_dot")]:
        y = jax.jit(experts_routed, static_argnums=(3, 4, 5, 6))(
            params, x, routing, activation, jnp.float32, compute, grouped_matmul)
        np.testing.assert_allclose(y, loop, atol=1e-5, rtol=1e-5,
                                   err_msg=f"{compute} {grouped_matmul}")
    return loop


def test_empty_expert_and_uneven_loads():
    rng = np.random.default_rng(0)
    g, s, d, e = 2, 6, 8, 4
    x = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
    # Logits that send nothing to expert 3, most tokens to expert 0.
    logits = np.full((g, s, e), -5.0, np.float32)
    logits[..., 0] = 3.0
    logits[:, ::3, 1] = 4.0
    logits[:, 1, 2] = 5.0
    r = route(jnp.asarray(logits), top_k=2, renormalize=True)
    counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=e)
    assert counts[3] == 0 and counts[0] > counts[2] > 0
    params = make_params(rng, e, d, 16, "swiglu", bias=False)
    check_every_compute(x, r, params, "swiglu")


def test_capacity_dropping_every_compute_agrees_and_drops():
    rng = np.random.default_rng(1)
    g, s, d, e = 1, 8, 8, 2
    x = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
    logits = jnp.asarray(np.tile([[3.0, 0.0]], (g, s, 1)), jnp.float32)   # all want expert 0
    r = route(logits, top_k=1, renormalize=False, capacity_factor=1.0)       # C = 4
    assert int(r.kept.sum()) == 4
    params = make_params(rng, e, d, 16, "relu", bias=True)
    out = check_every_compute(x, r, params, "relu")
    np.testing.assert_array_equal(out[0, 4:], 0.0)      # dropped tokens get no expert output


def test_different_output_width():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    r = route(jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32), top_k=2, renormalize=True)
    params = make_params(rng, 3, 6, 12, "gelu", bias=True, out=10)
    assert check_every_compute(x, r, params, "gelu").shape == (2, 5, 10)


@settings(max_examples=14, deadline=None)
@given(g=st.integers(1, 3), s=st.integers(1, 9), e=st.integers(1, 6), k=st.integers(1, 3),
       cf=st.sampled_from([None, 0.5, 1.0, 1.25, 2.0]),
       activation=st.sampled_from(["swiglu", "gelu", "relu"]), bias=st.booleans(),
       seed=st.integers(0, 2**16), masked=st.booleans())
def test_computes_agree_random(g, s, e, k, cf, activation, bias, seed, masked):
    k = min(k, e)
    rng = np.random.default_rng(seed)
    d, f = 4, 8
    x = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
    mask = jnp.asarray(rng.random((g, s)) > 0.3) if masked else None
    r = route(jnp.asarray(rng.normal(size=(g, s, e)) * 2, jnp.float32), top_k=k,
              renormalize=bool(seed % 2), capacity_factor=cf, token_mask=mask)
    check_every_compute(x, r, make_params(rng, e, d, f, activation, bias), activation)


def test_auto_compute_by_size():
    # E = 8, K = 2, blocked kernel: batch-1 decode gathers, batched decode broadcasts, prompts sort
    assert resolve_compute("auto", 1, 2, 8, "blocked") == "gather"
    assert resolve_compute("auto", 2, 2, 8, "blocked") == "broadcast"
    assert resolve_compute("auto", BROADCAST_TOKENS, 2, 8, "blocked") == "broadcast"
    assert resolve_compute("auto", BROADCAST_TOKENS + 1, 2, 8, "blocked") == "sorted"
    assert resolve_compute("auto", 4, 2, 8, "ragged_dot") == "sorted"   # a grouped GEMM off CPU
    # from a slot pool (every layer's experts): gather up to E/2 pairs, else sort
    assert resolve_compute("auto", 2, 2, 8, "blocked", pooled=True) == "gather"
    assert resolve_compute("auto", 3, 2, 8, "blocked", pooled=True) == "sorted"
    assert resolve_compute("broadcast", 512, 2, 8, "blocked") == "broadcast"
    assert resolve_compute("dense", 1, 2, 8, "blocked") == "dense"
    with pytest.raises(ValueError, match="'scatter'"):
        resolve_compute("scatter", 4, 2, 8, "blocked")


def test_broadcast_reads_pool_slots():
    """Forced onto a slot pool, broadcast runs every slot and picks each pair's slot."""
    rng = np.random.default_rng(3)
    e, d, f = 4, 6, 8
    params = make_params(rng, e, d, f, "swiglu", bias=True)
    x = jnp.asarray(rng.normal(size=(1, 5, d)), jnp.float32)
    r = route(jnp.asarray(rng.normal(size=(1, 5, e)), jnp.float32), top_k=2, renormalize=True)
    order = np.array([2, 0, 3, 1])                       # slot i holds expert order[i]
    pool = {n: v[order] for n, v in params.items()}
    slot_of = jnp.asarray(np.argsort(order), jnp.int32)
    want = experts_loop(params, x, r, "swiglu")
    got = experts_routed(pool, x, r, "swiglu", jnp.float32, "broadcast", "blocked", slot_of)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
