"""Cache policies for expert slots, and the cache core that executes their decisions.

The access stream is a sequence of layer visits: for every forward (a prefill or a decode step),
each MoE layer in order with the set of experts its tokens picked. At a visit, every needed expert
must be resident before the layer computes: a needed expert already in a slot is a **hit**; one
that is not is a **miss** and is loaded on demand, evicting a resident expert the policy chooses
(never one the current layer needs).

Slots: S in all. Per-layer policies (LRU and LFU, as in mixtral-offloading) split them evenly
across the MoE layers (the first S mod L layers get one more); `all-resident`, `on-demand` and
`belady` use one pool. The minimum budget is the largest need of one layer visit (per layer:
its share must hold it); `CacheCore` refuses a smaller one with an error stating the minimum.

A policy returns decisions (which resident experts to evict); `CacheCore` executes them, so the
live engine and the replay simulator count hits and misses identically.

Policies here serve demand loads only. Belady (evict the expert whose next use is furthest away,
given the whole future stream) is optimal among them and bounds their hit rate; prefetching
policies (pre-gated, predictive) count the hits their prefetches serve separately.
"""

from __future__ import annotations

import abc
import dataclasses
from collections import defaultdict

Key = tuple[int, int]              # (layer, expert)
Visit = tuple[int, frozenset]      # (layer, experts needed)


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    per_layer: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


class Policy(abc.ABC):
    """Chooses victims; sees every visit. Subclasses implement `victims` (and `observe`)."""

    name = "policy"
    per_layer = False

    def start(self, stream: list[Visit], slots: int) -> None:
        """Called once before a stream is run (offline policies read the future here)."""

    def observe(self, t: int, layer: int, needed: frozenset) -> None:
        """Visit t of the stream happened (after its loads)."""

    @abc.abstractmethod
    def victims(self, t: int, candidates: list[Key], count: int) -> list[Key]:
        """`count` of `candidates` (resident, not needed now, in the same partition) to evict."""


class AllResident(Policy):
    """Upper bound: every expert has a slot (needs a budget of all experts)."""

    name = "all-resident"

    def victims(self, t, candidates, count):
        raise RuntimeError("all-resident never evicts: the budget must hold every expert")


class OnDemand(Policy):
    """Load what the router picked, keep nothing: the core empties the pool at every visit."""

    name = "on-demand"

    def victims(self, t, candidates, count):
        raise RuntimeError("on-demand never has residents to evict")


class LRU(Policy):
    name = "lru"
    per_layer = True

    def __init__(self):
        self.last: dict[Key, int] = {}

    def observe(self, t, layer, needed):
        for e in needed:
            self.last[layer, e] = t

    def victims(self, t, candidates, count):
        return sorted(candidates, key=lambda k: (self.last.get(k, -1), k))[:count]


class LFU(Policy):
    """Evict the least frequently used so far (ties: least recently used)."""

    name = "lfu"
    per_layer = True

    def __init__(self):
        self.count: dict[Key, int] = defaultdict(int)
        self.last: dict[Key, int] = {}

    def observe(self, t, layer, needed):
        for e in needed:
            self.count[layer, e] += 1
            self.last[layer, e] = t

    def victims(self, t, candidates, count):
        return sorted(candidates, key=lambda k: (self.count[k], self.last.get(k, -1), k))[:count]


class Belady(Policy):
    """Offline optimal for demand caching: evict the expert needed furthest in the future."""

    name = "belady"

    def start(self, stream, slots):
        self.uses: dict[Key, list[int]] = defaultdict(list)
        for t, (layer, needed) in enumerate(stream):
            for e in needed:
                self.uses[layer, e].append(t)

    def _next_use(self, key: Key, t: int) -> float:
        import bisect
        uses = self.uses.get(key, [])
        i = bisect.bisect_right(uses, t)
        return uses[i] if i < len(uses) else float("inf")

    def victims(self, t, candidates, count):
        return sorted(candidates, key=lambda k: (-self._next_use(k, t), k))[:count]


POLICIES = {p.name: p for p in (AllResident, OnDemand, LRU, LFU, Belady)}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]()


class CacheCore:
    """Slot bookkeeping for one run: executes a policy's decisions over a stream of visits."""

    def __init__(self, policy: Policy, slots: int, layers: list[int], num_experts: int):
        self.policy, self.slots, self.layers = policy, slots, layers
        self.num_experts = num_experts
        if isinstance(policy, AllResident) and slots < len(layers) * num_experts:
            raise ValueError(f"all-resident needs {len(layers) * num_experts} expert slots, "
                             f"the budget gives {slots}")
        if policy.per_layer:
            base, extra = divmod(slots, len(layers))
            self.capacity = {l: base + (i < extra) for i, l in enumerate(layers)}
        else:
            self.capacity = {None: slots}
        self.resident: dict = {part: [] for part in self.capacity}   # partition -> [Key]
        self.stats = CacheStats()
        self.loads: list[tuple[int, Key, Key | None]] = []           # (t, loaded, evicted)

    def _part(self, layer: int):
        return layer if self.policy.per_layer else None

    def minimum_slots(self, stream: list[Visit]) -> int:
        need = max((len(n) for _, n in stream), default=0)
        return need * len(self.layers) if self.policy.per_layer else need

    def run(self, stream: list[Visit]) -> CacheStats:
        minimum = self.minimum_slots(stream)
        if self.slots < minimum:
            raise ValueError(f"budget of {self.slots} expert slots is below the minimum of "
                             f"{minimum} for policy {self.policy.name} on this stream (the "
                             "largest number of experts one layer visit needs"
                             + (", in every layer's share)" if self.policy.per_layer else ")"))
        self.policy.start(stream, self.slots)
        for t, visit in enumerate(stream):
            self.visit(t, *visit)
        return self.stats

    def visit(self, t: int, layer: int, needed: frozenset) -> None:
        part = self._part(layer)
        if len(needed) > self.capacity[part]:
            share = " per layer" if self.policy.per_layer else ""
            minimum = len(needed) * (len(self.layers) if self.policy.per_layer else 1)
            raise ValueError(f"layer {layer} needs {len(needed)} experts at once but policy "
                             f"{self.policy.name} has {self.capacity[part]} slots{share}; the "
                             f"minimum budget for this batch is {minimum} expert slots")
        resident = self.resident[part]
        if isinstance(self.policy, OnDemand):          # keeps nothing from earlier visits
            self.stats.evictions += len(resident)
            resident.clear()
        have = {k[1] for k in resident if k[0] == layer}
        missing = sorted(needed - have)
        hits = len(needed) - len(missing)
        self.stats.hits += hits
        self.stats.misses += len(missing)
        self.stats.per_layer[layer][0] += hits
        self.stats.per_layer[layer][1] += len(missing)
        free = self.capacity[part] - len(resident)
        if len(missing) > free:
            candidates = [k for k in resident if not (k[0] == layer and k[1] in needed)]
            evict = self.policy.victims(t, candidates, len(missing) - free)
            if len(evict) != len(missing) - free or not set(evict) <= set(candidates):
                raise RuntimeError(f"{self.policy.name} chose invalid victims {evict}")
            for k in evict:
                resident.remove(k)
            self.stats.evictions += len(evict)
        else:
            evict = []
        for i, e in enumerate(missing):
            resident.append((layer, e))
            self.loads.append((t, (layer, e), evict[i] if i < len(evict) else None))
        assert len(resident) <= self.capacity[part]
        self.policy.observe(t, layer, needed)


def stream_from_trace(trace, batch: int) -> list[Visit]:
    """Visits of a trace replayed in order, `batch` tokens per forward: for each group of tokens,
    each MoE layer with the union of the experts its tokens picked."""
    stream = []
    for start in range(0, len(trace), batch):
        rows = trace.experts[start:start + batch]
        for li, layer in enumerate(trace.moe_layers):
            stream.append((layer, frozenset(int(e) for e in rows[:, li].ravel())))
    return stream
