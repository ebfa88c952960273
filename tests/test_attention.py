"""Attention: the causal block path equals the one-block computation; sliding windows; GQA."""

import jax.numpy as jnp
import numpy as np
import pytest

from moex.nn.attention import CAUSAL_CHUNK, attend, causal_mask


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
