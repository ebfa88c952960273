"""Attention: the causal block path equals the one-block computation; sliding windows; GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.nn.attention import CAUSAL_CHUNK, _causal_blocks, attend, causal_mask
from moex.nn.layers import apply_rope


@pytest.mark.parametrize("window", [None, 37])
def test_causal_blocks_equal_one_block(window):
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 2 * CAUSAL_CHUNK + 45, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv, 5)), jnp.float32)
    valid = np.ones((b, t), bool)
    valid[1, :70] = False                                          # left padding
    mask = causal_mask(jnp.asarray(valid), window)
    full = attend(q, k, v, mask, 0.3)
    blocks = attend(q, k, v, mask, 0.3, causal_from_zero=True)
    np.testing.assert_allclose(np.asarray(blocks)[valid], np.asarray(full)[valid], atol=1e-6)


def test_row_at_a_time_equals_all_rows_at_once():
    """On CPU, attend() with B > 1 maps over batch rows; the whole-batch blocks (other backends)
    and each row alone give the same numbers."""
    rng = np.random.default_rng(2)
    b, t, h, kv, d = 3, CAUSAL_CHUNK + 20, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
    valid = np.ones((b, t), bool)
    valid[2, :9] = False
    mask = causal_mask(jnp.asarray(valid))
    rows = jax.jit(lambda *a: attend(*a, 0.3, causal_from_zero=True))(q, k, v, mask)
    batch = jax.jit(lambda *a: _causal_blocks(*a, 0.3))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(rows)[valid], np.asarray(batch)[valid], atol=1e-6)
    one = attend(q[2:], k[2:], v[2:], mask[2:], 0.3, causal_from_zero=True)
    np.testing.assert_allclose(np.asarray(rows)[2][valid[2]], np.asarray(one)[0][valid[2]],
                               atol=1e-6)


@pytest.mark.parametrize("rotary_dim", [8, 6])
def test_rope_rotates_pairs_of_halves(rotary_dim):
    """apply_rope equals the rotate-half formula written out on the two halves (bitwise)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 0, 1, 7, 9]])
    half = rotary_dim // 2
    freq = 1.0 / (100.0 ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / rotary_dim))
    angle = pos.astype(jnp.float32)[..., None] * freq
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    ref = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]], -1)
    np.testing.assert_array_equal(apply_rope(jnp.asarray(x), pos, 100.0, rotary_dim), ref)


def test_sliding_window_mask():
    m = np.asarray(causal_mask(jnp.ones((1, 6), bool), window=2))[0]
    assert m[5].tolist() == [False, False, False, False, True, True]
    assert m[0].tolist() == [True, False, False, False, False, False]


def test_query_attends_to_itself_only_at_start():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 3, 1, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 3, 1, 4)), jnp.float32)
    out = attend(q, k, v, causal_mask(jnp.ones((1, 3), bool)), 0.5)
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0], atol=1e-6)     # softmax over one key
    np.testing.assert_allclose(out[0, 0, 1], v[0, 0, 0], atol=1e-6)     # both heads share kv
