"""Grouped matmul: the CPU blocked loop and jax.lax.ragged_dot both equal a loop over groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.nn.grouped import (BIG_ROWS, TAIL_STEP, blocked_grouped_matmul, grouped_matmul,
                             tail_rows)


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


@pytest.mark.parametrize("sizes", [
    [0, 2 * BIG_ROWS + 3, 37, BIG_ROWS, BIG_ROWS + TAIL_STEP, 0, 3],   # whole windows + tails
    [BIG_ROWS - 1, 1, TAIL_STEP, TAIL_STEP + 1],                       # tails at every edge
    [0, 0, 5],                                                         # the last window ends at M
    [BIG_ROWS - 2],                                      # M = BIG_ROWS: x gets a spare row
    [TAIL_STEP, 0, BIG_ROWS - TAIL_STEP - 2],
])
def test_blocked_windows_equal_loop(sizes):
    m = sum(sizes) + 2
    rng = np.random.default_rng(len(sizes))
    x = rng.normal(size=(m, 6)).astype(np.float32)
    w = rng.normal(size=(len(sizes), 6, 4)).astype(np.float32)
    out = jax.jit(blocked_grouped_matmul)(x, w, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(out, loop_reference(x, w, sizes), atol=1e-4)


def test_tail_window_sizes():
    assert tail_rows(1000, 128, 32) == (32, 64, 96, 128)
    assert tail_rows(100, 128, 32) == (32, 64, 96, 100)
    assert tail_rows(3, 128, 32) == (3,)


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="grouped_matmul must be one of.*blocked.*'magic'"):
        grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), "magic")
