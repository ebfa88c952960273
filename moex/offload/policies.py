"""Expert cache policies. A policy returns decisions -- which residents to evict, which experts to
prefetch -- and `moex.offload.cache.CacheCore` executes them, so the live engine and the replay
simulator count identically. See cache.py for the access stream, rounds and the Belady bound.

  all-resident  every expert has a slot (the upper bound; needs the whole expert budget)
  on-demand     load what the router picked, keep nothing
  lru           per layer, evict the least recently used (mixtral-offloading's cache)
  lfu           per layer, evict the least frequently used (ties: least recently used)
  pregated      one pool with LRU eviction; while layer l computes, prefetch the experts that
                layer l+1's router picks from layer l's hidden state (training-free pre-gating)
  predictive    ExpertFlow's PLEC: at a forward's admission a forecaster gives (L_moe, E)
                probabilities; slots are allotted to layers in proportion to their predicted demand
                (sum of probabilities), each layer's most probable experts are prefetched in layer
                order, slots of layers this forward has finished are recycled first, and a
                prefetch never evicts a planned expert worth more than itself
  lookahead     one pool; while layer l computes, prefetch the experts that trained lookahead
                heads (`moex.predict.lookahead`) give a probability >= PREFETCH_PROB for the MoE
                layers l+1 .. l+d, nearest layer first, most probable first; eviction keeps the
                experts predicted for this forward's upcoming layers (by probability), then LRU
  predictive    with lookahead heads (`predictive:FORECAST+HEADS`, class Combined): PLEC's quotas
                and admission plan come from the forecast (the routing-path predictor), and at
                each layer the heads re-rank the layers l+1 .. l+d: their predictions replace the
                forecast's for those layers, and each layer's prefetch is its experts with
                probability >= PREFETCH_PROB up to the layer's quota (never fewer than those with
                probability >= 0.5); layers beyond the heads' reach keep the admission plan
  belady        offline optimal for demand caching: evict the expert needed furthest in the future
                (needs the whole stream: replay only)

Wrong guesses of any prefetching policy stay demand misses: prefetches only change which experts
are resident, never what a layer computes.
"""

from __future__ import annotations

import abc
import bisect
from collections import defaultdict

import numpy as np

from moex.offload.cache import Key, Visit


class Policy(abc.ABC):
    name = "policy"
    per_layer = False           # slots split evenly across MoE layers
    keeps_nothing = False
    needs_future = False        # replay only (Belady)
    uses_pregate = False        # wants Visit.pregate hints
    uses_forecast = False       # wants Visit.forecast at each forward's admission
    uses_lookahead = False      # wants Visit.lookahead hints from lookahead heads

    def __init__(self):
        self.last: dict[Key, int] = {}

    def check_budget(self, slots: int, num_layers: int, num_experts: int) -> None:
        """Raise if the policy cannot run with `slots`."""

    def start(self, stream: list[Visit], slots: int, layers: list[int]) -> None:
        """Called before a run (offline policies read the future here)."""
        self.slots, self.layers = slots, list(layers)
        self.index = {layer: i for i, layer in enumerate(self.layers)}     # layer -> position

    def enter(self, t: int, v: Visit) -> None:
        """Visit t begins (before its loads)."""

    def observe(self, t: int, v: Visit) -> None:
        """Visit t happened (after its loads)."""
        for e in v.needed:
            self.last[v.layer, e] = t

    def admit(self, t: int, v: Visit) -> list[Key]:
        """A forward starts (v carries the forecast): keys to prefetch, most wanted first."""
        return []

    def prefetch(self, t: int, v: Visit) -> list[Key]:
        """While v's layer computes: keys to prefetch, most wanted first."""
        return []

    def victims(self, t: int, candidates: list[Key], count: int, incoming: Key | None = None):
        """`count` of `candidates` to evict. For a prefetch of `incoming`, return fewer (none) to
        keep what is resident rather than prefetch."""
        return sorted(candidates, key=lambda k: (self.last.get(k, -1), k))[:count]


class AllResident(Policy):
    name = "all-resident"

    def check_budget(self, slots, num_layers, num_experts):
        if slots < num_layers * num_experts:
            raise ValueError(f"all-resident needs {num_layers * num_experts} expert slots, "
                             f"the budget gives {slots}")

    def victims(self, t, candidates, count, incoming=None):
        raise RuntimeError("all-resident never evicts: the budget must hold every expert")


class OnDemand(Policy):
    name = "on-demand"
    keeps_nothing = True


class LRU(Policy):
    name = "lru"
    per_layer = True


class LFU(Policy):
    name = "lfu"
    per_layer = True

    def __init__(self):
        super().__init__()
        self.count: dict[Key, int] = defaultdict(int)

    def observe(self, t, v):
        super().observe(t, v)
        for e in v.needed:
            self.count[v.layer, e] += 1

    def victims(self, t, candidates, count, incoming=None):
        return sorted(candidates, key=lambda k: (self.count[k], self.last.get(k, -1), k))[:count]


class Pregated(Policy):
    name = "pregated"
    uses_pregate = True

    def prefetch(self, t, v):
        i = self.index[v.layer]
        if v.pregate is None or i + 1 == len(self.layers):
            return []
        return [(self.layers[i + 1], e) for e in sorted(v.pregate)]


class ValuedEviction(Policy):
    """Eviction by a value per resident, `_value(key, t)` (a tuple, lowest evicted first); a
    prefetch of `incoming` replaces only a resident whose worth -- the value's first
    `worth_fields` entries -- is below its own."""

    worth_fields = 2

    @abc.abstractmethod
    def _value(self, key: Key, t: int) -> tuple:
        """The resident's value at visit t: lowest is evicted first."""

    def victims(self, t, candidates, count, incoming=None):
        value = lambda k: self._value(k, t)
        ranked = sorted(candidates, key=value)
        if incoming is not None:
            n = self.worth_fields
            ranked = [k for k in ranked if value(k)[:n] < value(incoming)[:n]]
        return ranked[:count]


class Predictive(ValuedEviction):
    name = "predictive"
    uses_forecast = True

    def __init__(self):
        super().__init__()
        self.forecast = None
        self.position = -1                # index of the MoE layer this forward is at
        self.plan: list[Key] = []

    def start(self, stream, slots, layers):
        super().start(stream, slots, layers)
        self.forecast, self.position, self.plan = None, -1, []

    def quotas(self, forecast: np.ndarray) -> np.ndarray:
        """Slots per layer, in proportion to predicted demand (largest remainder), each at most
        the layer's demand rounded up -- the forecast's expected number of distinct experts
        the layer uses -- and the number of experts it gives any chance, and at least one where
        it gives one (the quotas may then sum past S: finished layers' slots are recycled).
        The demand cap keeps a soft forecast (a predictor's, a prior's) from filling spare
        slots with unlikely experts: each one is a copy the link carries."""
        demand = forecast.sum(axis=1)
        cap = np.minimum((forecast > 0).sum(axis=1), np.ceil(demand - 1e-9).astype(int))
        if demand.sum() <= 0:
            return np.zeros(len(demand), int)
        share = self.slots * demand / demand.sum()
        q = np.minimum(np.floor(share).astype(int), cap)
        for i in np.argsort(-(share - np.floor(share)), kind="stable"):
            if q.sum() >= min(self.slots, cap.sum()):
                break
            if q[i] < cap[i]:
                q[i] += 1
        return np.maximum(q, np.minimum(cap, 1))

    def admit(self, t, v):
        f = np.asarray(v.forecast, np.float64)
        if f.shape != (len(self.layers), f.shape[-1]):
            raise ValueError(f"forecast has shape {f.shape}, expected ({len(self.layers)}, E)")
        self.forecast, self.position = f, -1
        self.belief = f.copy()                # what this forward is expected to use
        q = self.quota = self.quotas(f)
        self.plan = [(layer, int(e)) for i, layer in enumerate(self.layers)
                     for e in np.argsort(-f[i], kind="stable")[:q[i]]]
        return list(self.plan)

    def enter(self, t, v):
        if self.forecast is None:
            raise ValueError("predictive needs a forecast at each forward's first MoE layer "
                             "(give the engine or the replay a forecaster)")
        self.position = self.index[v.layer]

    def prefetch(self, t, v):
        if self.forecast is None:
            raise ValueError("predictive needs a forecast at each forward's first MoE layer "
                             "(give the engine or the replay a forecaster)")
        return [k for k in self.plan if self.index[k[0]] > self.position]

    def _value(self, key: Key, t: int):
        i = self.index[key[0]]
        upcoming = i > self.position
        return (upcoming, float(self.belief[i, key[1]]), self.last.get(key, -1), key)


PREFETCH_PROB = 0.2             # lookahead: prefetch an expert the heads give at least this


def ranked_ahead(lookahead: dict, index: dict) -> list:
    """Visit.lookahead {layer: (E,) probabilities} -> [(layer, probs)], nearest layer first."""
    return sorted(lookahead.items(), key=lambda kv: index[kv[0]])


def likely(probs: np.ndarray, limit: int | None = None) -> list[int]:
    """Experts with probability >= PREFETCH_PROB, most probable first, at most `limit` of them
    but never fewer than those with probability >= 0.5."""
    order = [int(e) for e in np.argsort(-probs, kind="stable") if probs[e] >= PREFETCH_PROB]
    sure = int((probs >= 0.5).sum())
    return order if limit is None else order[:max(limit, sure)]


class Lookahead(ValuedEviction):
    name = "lookahead"
    uses_lookahead = True

    def start(self, stream, slots, layers):
        super().start(stream, slots, layers)
        self.position, self.belief = -1, {}

    def enter(self, t, v):
        i = self.index[v.layer]
        if i <= self.position:                          # a new forward
            self.belief = {}
        self.position = i

    def prefetch(self, t, v):
        keys = []
        for layer, probs in ranked_ahead(v.lookahead or {}, self.index):
            self.belief.update({(layer, e): float(p) for e, p in enumerate(probs)})
            keys += [(layer, e) for e in likely(probs)]
        return keys

    def _value(self, key: Key, t: int):
        upcoming = self.index[key[0]] > self.position
        return (upcoming, self.belief.get(key, 0.0) if upcoming else 0.0, self.last.get(key, -1),
                key)


REUSE_PROB = 0.5               # combined: chance that an expert used in this forward serves the
                               # next forward too (about the previous-token baseline's recall on
                               # the study's traces, 0.3-0.5)


class Combined(Predictive):
    """`predictive` with lookahead heads (see the module docstring). Eviction weighs what each
    resident is worth in probabilities: an expert of an upcoming layer its prediction (the
    heads' where they reached, else the forecast's), one this forward already used REUSE_PROB
    (the next forward may need it again), any other 0; a prefetch replaces only a resident worth
    less than itself, so a guess at 0.2 three layers ahead never evicts an expert likely to be
    reused."""

    name = "predictive+lookahead"
    uses_lookahead = True
    worth_fields = 1

    def admit(self, t, v):
        self.admitted = t
        return super().admit(t, v)

    def _value(self, key: Key, t: int):
        i = self.index[key[0]]
        if i > self.position:
            worth = float(self.belief[i, key[1]])
        else:
            worth = REUSE_PROB if self.last.get(key, -1) >= self.admitted else 0.0
        return (worth, self.last.get(key, -1), key)

    def prefetch(self, t, v):
        if self.forecast is None:
            return super().prefetch(t, v)
        keys, reach = [], self.position
        for layer, probs in ranked_ahead(v.lookahead or {}, self.index):
            i = self.index[layer]
            self.belief[i] = probs
            keys += [(layer, e) for e in likely(probs, int(self.quota[i]))]
            reach = max(reach, i)
        return keys + [k for k in self.plan if self.index[k[0]] > reach]


class Belady(Policy):
    name = "belady"
    needs_future = True

    def start(self, stream, slots, layers):
        super().start(stream, slots, layers)
        self.uses: dict[Key, list[int]] = defaultdict(list)
        for t, v in enumerate(stream):
            for e in v.needed:
                self.uses[v.layer, e].append(t)

    def _next_use(self, key: Key, t: int) -> float:
        uses = self.uses.get(key, [])
        i = bisect.bisect_right(uses, t)
        return uses[i] if i < len(uses) else float("inf")

    def victims(self, t, candidates, count, incoming=None):
        return sorted(candidates, key=lambda k: (-self._next_use(k, t), k))[:count]


POLICIES = {p.name: p for p in (AllResident, OnDemand, LRU, LFU, Pregated, Predictive, Lookahead,
                                Belady)}


def make_policy(name: str, lookahead: bool = False) -> Policy:
    """The policy `name`; predictive with `lookahead` is the combined policy."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    if lookahead and name == "predictive":
        return Combined()
    return POLICIES[name]()
