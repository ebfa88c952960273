"""How many experts a batch touches: the routing model the performance model reads.

Shape letters: E experts, K chosen per token, n tokens in one forward at one MoE layer.

A routed-expert piece reads the weights of every distinct expert its n tokens chose, so its
bytes depend on `distinct(n)`, and a grouped kernel's padded rows on the tokens per expert.
  UniformRouting(E, K)   every token picks K distinct experts uniformly at random:
                         distinct(n) = E (1 - (1 - K/E)^n), rows per expert nK/E each.
  TraceRouting(trace)    measured on a routing trace: for n, many random sets of n traced
                         tokens (within one MoE layer, all layers pooled) and their mean
                         distinct count and per-expert rows. Skewed, correlated routing
                         touches fewer experts than uniform at the same n.
Both are deterministic (seeded) so a prediction is reproducible.
"""

from __future__ import annotations

import functools

import numpy as np


class UniformRouting:
    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.name = "uniform"

    def distinct(self, n: float) -> float:
        e, k = self.num_experts, self.top_k
        return e * (1.0 - (1.0 - k / e) ** max(n, 0.0))

    def rows(self, n: int) -> np.ndarray:
        """(E,) expected rows (token-expert pairs) per expert for n tokens."""
        return np.full(self.num_experts, n * self.top_k / self.num_experts)


class TraceRouting:
    """Distinct experts and rows per expert measured on a routing trace (moex.offload.trace)."""

    def __init__(self, trace, samples: int = 64, seed: int = 0):
        self.num_experts, self.top_k = trace.num_experts, trace.top_k
        self.experts = np.asarray(trace.experts)              # (N, L, K)
        self.samples, self.seed = samples, seed
        self.name = f"trace:{trace.model}"

    @functools.lru_cache(maxsize=None)
    def _stats(self, n: int) -> tuple[float, tuple]:
        rng = np.random.default_rng(self.seed)
        total, layers = len(self.experts), self.experts.shape[1]
        distinct, rows = [], np.zeros(self.num_experts)
        for _ in range(self.samples):
            layer = rng.integers(layers)
            pick = rng.choice(total, size=min(n, total), replace=n > total)
            chosen = self.experts[pick, layer].reshape(-1)
            chosen = chosen[chosen >= 0]
            counts = np.bincount(chosen, minlength=self.num_experts)
            distinct.append(np.count_nonzero(counts))
            rows += np.sort(counts)[::-1]               # by rank: the busiest expert first
        return float(np.mean(distinct)), tuple(rows / self.samples)

    def distinct(self, n: float) -> float:
        return self._stats(max(int(round(n)), 1))[0]

    def rows(self, n: int) -> np.ndarray:
        return np.asarray(self._stats(max(int(n), 1))[1])


def routing_for(moe, trace=None):
    """The routing model of an MoE config: the trace's when one is given and its expert count
    matches, else uniform."""
    if trace is not None:
        if (trace.num_experts, trace.top_k) != (moe.num_experts, moe.top_k):
            raise ValueError(f"trace {trace.model} has {trace.num_experts} experts top-"
                             f"{trace.top_k}; the model has {moe.num_experts} top-{moe.top_k}: "
                             f"map it first (moex.perf.projection.map_trace)")
        return TraceRouting(trace)
    return UniformRouting(moe.num_experts, moe.top_k)
