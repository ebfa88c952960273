"""Grouped matmul: rows of x sorted by group, each group multiplied by its own weight matrix.

Shape letters: M rows, K in width, N out width, G groups, b block rows.

    y[r] = x[r] @ w[g(r)]   for the rows r of group g (rows past sum(group_sizes) give 0)

Two implementations with the semantics of `jax.lax.ragged_dot`:
  ragged_dot  `jax.lax.ragged_dot`. On GPU/TPU a grouped GEMM; on the CPU backend of jax 0.10 it
              lowers to a masked dense contraction over all G groups (G times the FLOPs).
  blocked     a loop over the non-empty groups; each group's rows go through its matrix in
              windows of 128 rows, then at most one window each of 64, 32, 16, then windows of 8
              (rows of a window outside the group keep their value). FLOPs are the rows' plus
              under 8 rows per group, each weight is read a few times: the fast path on CPU.
              Its loops have data-dependent trip counts, so it is for inference (no reverse-mode
              gradient); training uses ragged_dot.
'auto' picks blocked on CPU and ragged_dot elsewhere. Tests hold both equal to a loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "ragged_dot", "blocked")


def _windows(y, x, fn, lo, hi, c: int, cover_all: bool):
    """y[r] = fn(x[r]) for rows r in [lo, hi), in windows of c rows starting at lo.

    cover_all False: only the whole windows that fit (floor); True: enough windows to cover
    [lo, hi) (ceil). Window rows outside [lo, hi) keep their old y. Returns (y, first row not done).
    """
    m = x.shape[0]
    count = (hi - lo + c - 1) // c if cover_all else (hi - lo) // c

    def body(i, y):
        s = jnp.minimum(lo + i * c, m - c)
        yb = fn(jax.lax.dynamic_slice_in_dim(x, s, c)).astype(y.dtype)
        rows = s + jnp.arange(c)
        keep = ((rows >= lo) & (rows < hi))[:, None]
        old = jax.lax.dynamic_slice_in_dim(y, s, c)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep, yb, old), s, 0)

    return jax.lax.fori_loop(0, count, body, y), jnp.minimum(lo + count * c, hi)


def window_rows(m: int, big: int = 128, small: int = 8) -> tuple[int, ...]:
    """Static window sizes, largest first: 128, 64, ..., 8 (each no larger than M)."""
    sizes, c = [], min(big, m)
    while c > small:
        sizes.append(c)
        c //= 2
    return tuple(sizes) + (min(small, m),)


def blocked_map(x, group_sizes, group_fn, n_out: int, num_groups: int):
    """y[r] = group_fn(g)(x[r]) for the rows r of group g, rows sorted by group; rows past
    sum(group_sizes) give 0. group_fn(g) is called once per non-empty group (inside the loop) and
    returns a function of a (c, K) window of rows."""
    m = x.shape[0]
    levels = window_rows(m)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes

    def per_group(e, y):
        fn = group_fn(e)
        lo = starts[e]
        for i, c in enumerate(levels):        # 128-row windows, then at most one of 64 .. 16,
            y, lo = _windows(y, x, fn, lo, ends[e], c, cover_all=i == len(levels) - 1)
        return y                              # then 8-row windows cover the rest

    def maybe(e, y):
        return jax.lax.cond(sizes[e] > 0, per_group, lambda e, y: y, e, y)

    return jax.lax.fori_loop(0, num_groups, maybe, jnp.zeros((m, n_out), x.dtype))


def blocked_grouped_matmul(x, w, group_sizes):
    def group_fn(e):
        we = w[e]
        return lambda xb: jnp.dot(xb, we, preferred_element_type=jnp.float32)
    return blocked_map(x, group_sizes, group_fn, w.shape[2], w.shape[0])


def resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl must be one of {IMPLS}, found {impl!r}")
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl


def grouped_matmul(x, w, group_sizes, impl: str = "auto"):
    """x (M, K) sorted by group; w (G, K, N); group_sizes (G,) int32 -> (M, N)."""
    impl = resolve(impl)
    w = jnp.asarray(w, x.dtype)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32))
    return blocked_grouped_matmul(x, w, group_sizes)
