"""Token scheduler (ExpertFlow §3.3): re-split two adjacent batches so that each batch needs fewer
distinct experts, and carry every request's KV cache with it.

Shape letters: N = 2T requests (or tokens), L MoE layers, E experts.

    a, b = schedule(routes)            # routes (N, L, E) bool: predicted routes per request
    objective(routes, a, b)            # sum over layers of distinct experts in a + in b

Objective: sum over layers of |OR_{i in a} r_i[l]| + |OR_{i in b} r_i[l]|, for two halves of equal
size (T each). `schedule` runs ExpertFlow's 2-cluster iteration on the similarity
S_ij = 1 - hamming(r_i, r_j) / (L * E): start from the two least similar requests as centroids,
assign by the difference of similarities to the two centroids (the T most A-leaning requests go
to A, keeping the halves equal), recompute each centroid as its members' mean route, repeat until
the split stops changing; it returns the FIFO split (first T | last T) whenever that is at least
as good, so it is never worse than FIFO on the objective. Each half is sorted (stable order).

`split_caches(cache_a, cache_b, a, b)` moves KV-cache rows with their requests: the two batches'
caches (same max length and write index, as batches admitted together are) are concatenated
along the batch axis and re-split by the schedule.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def objective(routes, a, b) -> int:
    r = np.asarray(routes, bool)
    return int(r[a].any(0).sum() + r[b].any(0).sum())


def similarity(routes) -> np.ndarray:
    r = np.asarray(routes, bool).reshape(len(routes), -1).astype(np.int32)
    ham = r @ (1 - r).T + (1 - r) @ r.T
    return 1.0 - ham / r.shape[1]


def schedule(routes, max_iter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(routes, bool)
    n = len(r)
    if n % 2:
        raise ValueError(f"the scheduler splits 2T requests into two halves; found {n}")
    half = n // 2
    fifo = (np.arange(half), np.arange(half, n))
    if n < 4:
        return fifo
    flat = r.reshape(n, -1).astype(np.float64)
    sim = similarity(r)
    i, j = np.unravel_index(np.argmin(sim + np.eye(n) * 2), sim.shape)
    centroids = flat[[i, j]]
    assign = None
    for _ in range(max_iter):
        # similarity to a (fractional) centroid: 1 - mean |r - c|
        s = 1.0 - np.abs(flat[:, None, :] - centroids[None]).mean(-1)     # (N, 2)
        lean = s[:, 0] - s[:, 1]
        order = np.argsort(-lean, kind="stable")
        new = np.zeros(n, bool)
        new[order[:half]] = True
        if assign is not None and (new == assign).all():
            break
        assign = new
        centroids = np.stack([flat[assign].mean(0), flat[~assign].mean(0)])
    a, b = np.flatnonzero(assign), np.flatnonzero(~assign)
    if objective(r, a, b) >= objective(r, *fifo):
        return fifo
    return a, b


def split_caches(cache_a: dict, cache_b: dict, a, b) -> tuple[dict, dict]:
    """KV caches of the two scheduled batches, rows following their requests (indices into the
    concatenation of the batches' rows, as `schedule` returns)."""
    if int(cache_a["index"]) != int(cache_b["index"]) or \
            cache_a["valid"].shape[1] != cache_b["valid"].shape[1]:
        raise ValueError("both batches' caches must have the same length and write index "
                         f"(found {cache_a['valid'].shape[1]} / {int(cache_a['index'])} and "
                         f"{cache_b['valid'].shape[1]} / {int(cache_b['index'])})")
    merged = {
        "index": cache_a["index"],
        "valid": jnp.concatenate([cache_a["valid"], cache_b["valid"]]),
        "pos": jnp.concatenate([cache_a["pos"], cache_b["pos"]]),
        "layers": tuple({k: jnp.concatenate([la[k], lb[k]]) for k in la}
                        for la, lb in zip(cache_a["layers"], cache_b["layers"])),
    }

    def take(rows):
        rows = jnp.asarray(rows)
        return {"index": jnp.array(merged["index"], copy=True), "valid": merged["valid"][rows],
                "pos": merged["pos"][rows],
                "layers": tuple({k: v[rows] for k, v in layer.items()}
                                for layer in merged["layers"])}
    return take(a), take(b)
