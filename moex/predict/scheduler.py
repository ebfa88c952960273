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

Encoder-decoder models: what is re-split between batches are decoder tokens (a decode step's
fed tokens), and only the decoder's MoE layers count: pass `layers` (L,) bool (the decoder's:
`~Examples.in_encoder`) to `schedule` / `objective` / `similarity`, or build the vectors from a
trace's expert ids with `routing_vectors` (its -1 entries, the layers a token did not run, are
no expert; `trace_vectors(trace, rows)` keeps the layers the rows ran).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _counted(routes, layers=None) -> np.ndarray:
    """routes (N, L, E) as bool, only the `layers` (L,) bool that count (None: all)."""
    r = np.asarray(routes, bool)
    return r if layers is None else r[:, np.asarray(layers, bool)]


def routing_vectors(experts, num_experts: int, layers=None) -> np.ndarray:
    """Per-token routing vectors (N, L', E) bool from chosen expert ids (N, L, K) (a trace's
    `experts`; -1: the token did not run the layer, no expert), over the `layers` (L,) bool that
    count (None: all L)."""
    ids = np.asarray(experts)
    out = np.zeros((*ids.shape[:2], num_experts), bool)
    n, layer, _ = np.nonzero(ids >= 0)
    out[n, layer, ids[ids >= 0]] = True
    return _counted(out, layers)


def trace_vectors(trace, rows) -> np.ndarray:
    """routing_vectors of trace rows over the layers they ran (all L for a decoder LM; an
    encoder-decoder's decoder rows: the decoder's MoE layers). The rows must run the same
    layers (one stack's tokens)."""
    ran = trace.layer_mask()[np.asarray(rows)]
    if len(ran) and not (ran == ran[0]).all():
        raise ValueError("the scheduler re-splits tokens that run the same MoE layers; the rows "
                         "mix an encoder-decoder's encoder and decoder tokens: pass one stack's")
    return routing_vectors(trace.experts[rows], trace.num_experts,
                           ran[0] if len(ran) else None)


def objective(routes, a, b, layers=None) -> int:
    r = _counted(routes, layers)
    return int(r[a].any(0).sum() + r[b].any(0).sum())


def similarity(routes, layers=None) -> np.ndarray:
    r = _counted(routes, layers)
    r = r.reshape(len(r), -1).astype(np.int32)
    ham = r @ (1 - r).T + (1 - r) @ r.T
    return 1.0 - ham / r.shape[1]


def schedule(routes, max_iter: int = 20, layers=None) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) indices of the two halves; `layers` (L,) bool: the MoE layers that count (None:
    all; an encoder-decoder's decode step: the decoder's)."""
    r = _counted(routes, layers)
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
