"""Grouped matmul: the CPU blocked loop and jax.lax.ragged_dot both equal a loop over groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.nn.grouped import blocked_grouped_matmul, grouped_matmul, window_rows


def loop_reference(x, w, sizes):
    y = np.zeros((x.shape[0], w.shape[2]), np.float32)
    start = 0
    for g, n in enumerate(sizes):
        y[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return y


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), unused=st.integers(0, 20),
       seed=st.integers(0, 1000))
def test_blocked_and_ragged_dot_equal_loop(sizes, unused, seed):
    m = sum(sizes) + unused
    if m == 0:
        return
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 5)).astype(np.float32)
    w = rng.normal(size=(len(sizes), 5, 3)).astype(np.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    ref = loop_reference(x, w, sizes)
    np.testing.assert_allclose(jax.jit(blocked_grouped_matmul)(x, w, gs), ref, atol=1e-4)
    np.testing.assert_allclose(jax.jit(jax.lax.ragged_dot)(x, w, gs), ref, atol=1e-4)


def test_window_sizes():
    assert window_rows(1000) == (128, 64, 32, 16, 8)
    assert window_rows(20) == (20, 10, 8)
    assert window_rows(3) == (3,)


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="blocked"):
        grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), "magic")
