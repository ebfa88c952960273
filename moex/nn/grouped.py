"""Grouped matmul: rows of x sorted by group, each group multiplied by its own weight matrix.

Shape letters: M rows, K in width, N out width, G groups, b block rows.

    y[r] = x[r] @ w[g(r)]   for the rows r of group g (rows past sum(group_sizes) give 0)

Two kernels with the semantics of `jax.lax.ragged_dot`, named by `grouped_matmul` (one of
GROUPED_MATMUL, the `MoEConfig.grouped_matmul` field):
  ragged_dot  `jax.lax.ragged_dot`. On GPU/TPU a grouped GEMM; on the CPU backend of jax 0.10 it
              lowers to a masked dense contraction over all G groups (G times the FLOPs).
  blocked     a loop over the groups; each group's rows go through its matrix in
              windows of 512 rows, then one window of 32, 64, ..., 512 rows covers the rest
              (rows of a window outside the group keep their value). Every window is one GEMM of
              at least 32 rows (a tail of many small windows would reread the weights for few
              rows, and small GEMMs run below XLA's CPU peak), at the price of under 32 padding
              rows per group: the fast path on CPU.
              Its loops have data-dependent trip counts, so it is for inference (no reverse-mode
              gradient); training computes experts by the one-hot einsum (compute 'dense', see
              moex.training).
'auto' picks blocked on CPU and ragged_dot elsewhere. Tests hold both equal to a loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moex.config import GROUPED_MATMUL

BIG_ROWS = 512    # rows of the whole windows of a group
TAIL_STEP = 32    # the last window of a group has a multiple of this many rows
SPARE_ROWS = 1    # rows added below x when one window would span all of it (see blocked_map)


def _window(y, x, fn, s, lo, hi, c: int):
    """y[r] = fn(x[r]) for rows r in [lo, hi) of the c-row window starting at row s; the
    window's other rows keep their old y."""
    yb = fn(jax.lax.dynamic_slice_in_dim(x, s, c)).astype(y.dtype)
    rows = s + jnp.arange(c)
    keep = ((rows >= lo) & (rows < hi))[:, None]
    old = jax.lax.dynamic_slice_in_dim(y, s, c)
    return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep, yb, old), s, 0)


def _whole_windows(y, x, fn, lo, hi, c: int):
    """y[r] = fn(x[r]) for the rows of the whole c-row windows that fit in [lo, hi) from lo.
    Returns (y, first row not done)."""
    count = (hi - lo) // c
    body = lambda i, y: _window(y, x, fn, lo + i * c, lo, hi, c)
    return jax.lax.fori_loop(0, count, body, y), lo + count * c


def tail_rows(m: int, big: int = BIG_ROWS, step: int = TAIL_STEP) -> tuple[int, ...]:
    """Static sizes of the last window of a group, smallest first: step, 2 step, ... up to
    min(big, M) (the last one is min(big, M) itself)."""
    top = min(big, m)
    return tuple(range(step, top, step)) + (top,)


def _tail_window(y, x, fn, lo, hi, sizes: tuple[int, ...]):
    """y[r] = fn(x[r]) for the rows r in [lo, hi) (at most sizes[-1], maybe none) with one
    window: the smallest of `sizes` that covers them, starting at lo (or ending at row M).

    lax.switch picks the size; each branch returns its rows inside a (sizes[-1], N) block, so y
    itself never passes through a conditional (XLA would copy all M rows of it)."""
    m, big, n_out = x.shape[0], sizes[-1], y.shape[1]
    at = jnp.minimum(lo, m - big)                      # the block holds every window's rows

    def branch(c):
        def window():
            s = jnp.minimum(lo, m - c)
            yb = fn(jax.lax.dynamic_slice_in_dim(x, s, c)).astype(y.dtype)
            return jax.lax.dynamic_update_slice_in_dim(
                jnp.zeros((big, n_out), y.dtype), yb, s - at, 0)
        return window

    nothing = lambda: jnp.zeros((big, n_out), y.dtype)
    chosen = jnp.searchsorted(jnp.asarray((0,) + sizes), hi - lo)    # 0: no rows left
    block = jax.lax.switch(chosen, [nothing] + [branch(c) for c in sizes])
    rows = at + jnp.arange(big)
    keep = ((rows >= lo) & (rows < hi))[:, None]
    old = jax.lax.dynamic_slice_in_dim(y, at, big)
    return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep, block, old), at, 0)


def blocked_map(x, group_sizes, group_fn, n_out: int, num_groups: int):
    """y[r] = group_fn(g)(x[r]) for the rows r of group g, rows sorted by group; rows past
    sum(group_sizes) give 0. group_fn(g) is called once per group (inside the loop) and returns
    a function of a (c, K) window of rows; an empty group runs no window."""
    m = x.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    big = min(BIG_ROWS, m)
    tails = tail_rows(m, big, TAIL_STEP)
    # XLA's CPU backend runs the loop much slower when a window spans the whole array
    # (M <= BIG_ROWS: decode steps, short prompts, the vision tower), so give x SPARE_ROWS more
    # rows, in no group: every window then covers part of it only
    spare = SPARE_ROWS if big == m else 0
    xp = jnp.pad(x, ((0, spare), (0, 0)))

    def per_group(e, y):
        fn = group_fn(e)
        y, lo = _whole_windows(y, xp, fn, starts[e], ends[e], big)
        return _tail_window(y, xp, fn, lo, ends[e], tails)

    y = jax.lax.fori_loop(0, num_groups, per_group, jnp.zeros((m + spare, n_out), x.dtype))
    return y[:m]


def blocked_grouped_matmul(x, w, group_sizes):
    def group_fn(e):
        we = w[e]
        return lambda xb: jnp.dot(xb, we, preferred_element_type=jnp.float32)
    return blocked_map(x, group_sizes, group_fn, w.shape[2], w.shape[0])


def resolve_grouped_matmul(grouped_matmul: str) -> str:
    """The kernel ('ragged_dot' or 'blocked') that `grouped_matmul` names on this backend."""
    if grouped_matmul not in GROUPED_MATMUL:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMUL}, found "
                         f"{grouped_matmul!r}")
    if grouped_matmul == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return grouped_matmul


def grouped_matmul(x, w, group_sizes, grouped_matmul: str = "auto"):
    """x (M, K) sorted by group; w (G, K, N); group_sizes (G,) int32 -> (M, N), by the kernel
    `grouped_matmul` names."""
    kernel = resolve_grouped_matmul(grouped_matmul)
    w = jnp.asarray(w, x.dtype)
    if kernel == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32))
    return blocked_grouped_matmul(x, w, group_sizes)
