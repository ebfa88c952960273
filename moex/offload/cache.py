"""The cache core: slot bookkeeping that executes a policy's decisions over a stream of visits.

The access stream is a sequence of layer visits: for every forward (a prefill or a decode step),
each MoE layer in order with the set of experts its tokens picked. Before a layer computes, every
needed expert must be resident: one already in a slot is a **hit**; one that is not is a
**miss**, loaded on demand (first, before any prefetch) into a free slot or over a victim the
policy chooses (never one the current layer needs). A visit may carry hints for prefetching
policies: `pregate` (the experts the next MoE layer's router picks from this layer's hidden
state), `lookahead` (lookahead heads' probabilities for the MoE layers ahead) and, at a
forward's first MoE layer, `forecast` ((L_moe, E) probabilities that the
forward uses each expert; `admit` runs the policy's admission prefetch before the forward).

Slots: S in all. Per-layer policies (LRU and LFU, as in mixtral-offloading) split them evenly
across the MoE layers (the first S mod L layers get one more); the others use one pool.

Streaming in rounds: a visit that needs more experts than its partition holds is served in
rounds -- the resident needed experts plus as many missing ones as fit compute first, then
the computed ones make room for the next batch of missing experts -- so any budget of at least
one slot per partition runs (`minimum_slots`). With `rounds=False` the core instead refuses a
visit that does not fit, stating the minimum budget.

Misses served otherwise (`moex.offload.misses`): with a `MissRule` a missed expert may be
loaded from its low-precision copy (a Load of kind "low"; it stays resident at low precision
until an "upgrade" load, issued with the prefetches, brings the stored copy into its slot) or
computed on the host (`Plan.host`: it is not loaded and takes no slot; with `fill` its stored
copy is then prefetched, a Load of kind "fill" counted as a prefetch). Both still count as
misses; `served_low` and `served_host` count them. The rule reads each missed expert's rows
(`Visit.rows`).

Prefetch accounting: a prefetched expert is *used* when its layer's next visit needs it, and
*wasted* when that visit does not (it then becomes stale: first in line for eviction) or when it
is evicted before its layer comes. Unused prefetches left at the end of a run count as wasted.

Bounds: on a stream whose visits fit the budget, Belady's number of loads is at most any
policy's loads (misses + prefetches) -- any prefetching schedule can be made lazy without adding
loads -- so Belady's hit rate bounds every policy's `reuse_rate` (1 - loads / accesses); a
prefetching policy's `hit_rate` also counts the accesses its prefetches served and may exceed
it. With rounds a policy needs only one of a visit's experts resident at a time, so the bound for
any budget is `belady_bound`: Belady on the relaxed stream where a visit's experts are accessed
one at a time (the resident ones first, then the missing ones, the one needed again soonest
last).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import defaultdict
from typing import NamedTuple

import numpy as np

Key = tuple[int, int]              # (layer, expert)


class Visit(NamedTuple):
    layer: int
    needed: frozenset
    forward: int = 0
    pregate: frozenset | None = None        # predicted experts of the next MoE layer
    forecast: np.ndarray | None = None      # (L_moe, E), at a forward's first MoE visit
    tokens: int = 0                         # tokens in the forward (for the compute model)
    lookahead: dict | None = None           # {MoE layer ahead: (E,) probabilities} from heads
    rows: tuple | None = None               # ((expert, token-expert pairs), ...) of `needed`


def expert_rows(ids) -> tuple:
    """((expert, pairs), ...) of an array of chosen expert ids (-1 entries ignored)."""
    values, counts = np.unique(np.asarray(ids).ravel(), return_counts=True)
    return tuple((int(e), int(c)) for e, c in zip(values, counts) if e >= 0)


class Load(NamedTuple):
    t: int
    key: Key
    victim: Key | None
    kind: str                          # "demand" | "low" (demand, low-precision copy) |
                                       # "prefetch" | "upgrade" (the stored copy over a low one)
    round: int                         # demand: the visit's round; prefetch: -1 admit, 0 after


class Round(NamedTuple):
    loads: list                        # [Load]: evict victim (if any), then load key
    experts: frozenset                 # experts of the visited layer computed in this round


class Plan(NamedTuple):
    rounds: list                       # [Round], at least one
    prefetch: list                     # [Load] issued after the layer's compute is dispatched
    dropped: list = []                 # [Key] evicted before the visit (on-demand keeps nothing)
    host: frozenset = frozenset()      # experts of the visited layer computed on the host


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    evictions: int = 0
    extra_rounds: int = 0
    served_low: int = 0                # misses served from a low-precision copy
    served_host: int = 0               # misses computed on the host
    upgrades: int = 0                  # stored copies loaded over low-precision ones
    # layer -> [hits, misses, prefetches, prefetch_used, prefetch_wasted]
    per_layer: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0] * 5))

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 1.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches

    @property
    def reuse_rate(self) -> float:
        """1 - loads / accesses: the hit rate without credit for prefetches (Belady bounds it)."""
        return (self.accesses - self.loads) / self.accesses if self.accesses else 1.0

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("hits", "misses", "prefetches", "prefetch_used",
                                             "prefetch_wasted", "evictions", "extra_rounds",
                                             "served_low", "served_host", "upgrades")}
        out.update(hit_rate=self.hit_rate, reuse_rate=self.reuse_rate,
                   per_layer={int(l): dict(zip(("hits", "misses", "prefetches", "prefetch_used",
                                                "prefetch_wasted"), v))
                              for l, v in sorted(self.per_layer.items())})
        return out


class CacheCore:
    """Executes a policy over a stream of visits; `loads` logs every copy in issue order."""

    def __init__(self, policy, slots: int, layers: list[int], num_experts: int,
                 rounds: bool = True, misses=None):
        """misses: a `moex.offload.misses.MissRule` (None: every miss loads the stored copy)."""
        self.policy, self.slots, self.layers = policy, slots, list(layers)
        self.num_experts, self.rounds = num_experts, rounds
        self.misses = None if misses is None or misses.spec.plain else misses
        policy.check_budget(slots, len(layers), num_experts)
        if policy.per_layer:
            base, extra = divmod(slots, len(layers))
            self.capacity = {l: base + (i < extra) for i, l in enumerate(layers)}
        else:
            self.capacity = {None: slots}
        if min(self.capacity.values()) < 1:
            parts = len(self.capacity)
            raise ValueError(f"budget of {slots} expert slots is below the minimum of {parts} "
                             f"for policy {policy.name}"
                             + (" (one slot per layer)" if policy.per_layer else ""))
        self.resident: dict = {part: [] for part in self.capacity}   # partition -> [Key]
        self.stats = CacheStats()
        self.loads: list[Load] = []
        self.pending: set[Key] = set()          # prefetched, its layer not visited since
        self.stale: set[Key] = set()            # prefetched, its layer's visit did not need it
        self.low: set[Key] = set()              # resident from a low-precision copy
        self.policy.start([], slots, self.layers)

    # -- budget ---------------------------------------------------------------------------------
    def _part(self, layer: int):
        return layer if self.policy.per_layer else None

    def minimum_slots(self, stream: list[Visit]) -> int:
        parts = len(self.layers) if self.policy.per_layer else 1
        if self.rounds:
            return parts
        return max((len(v.needed) for v in stream), default=0) * parts

    def _refuse(self, layer: int, need: int) -> None:
        parts = len(self.layers) if self.policy.per_layer else 1
        share = " per layer" if self.policy.per_layer else ""
        raise ValueError(f"layer {layer} needs {need} experts at once but policy "
                         f"{self.policy.name} has {self.capacity[self._part(layer)]} slots"
                         f"{share}; without streaming in rounds the minimum budget for this "
                         f"batch is {need * parts} expert slots")

    # -- running a stream -------------------------------------------------------------------------
    def run(self, stream: list[Visit]) -> CacheStats:
        stream = [Visit(*v) for v in stream]
        minimum = self.minimum_slots(stream)
        if self.slots < minimum:
            raise ValueError(f"budget of {self.slots} expert slots is below the minimum of "
                             f"{minimum} for policy {self.policy.name} on this stream"
                             + (" (one slot per layer)" if self.policy.per_layer else ""))
        self.policy.start(stream, self.slots, self.layers)
        for t, v in enumerate(stream):
            if v.forecast is not None:
                self.admit(t, v)
            self.visit(t, v)
        self.finish()
        return self.stats

    def finish(self) -> None:
        """Unused prefetches at the end of a run count as wasted."""
        for key in self.pending:
            self._waste(key)
        self.pending.clear()

    def admit(self, t: int, v: Visit) -> list[Load]:
        """A forward starts: the policy's admission prefetch (before any layer computes)."""
        return self._prefetch(t, v, self.policy.admit(t, v), round_=-1)

    def visit(self, t: int, v: Visit) -> Plan:
        v = Visit(*v)
        layer, needed = v.layer, v.needed
        part = self._part(layer)
        cap = self.capacity[part]
        if len(needed) > cap and not self.rounds:
            self._refuse(layer, len(needed))
        resident = self.resident[part]
        dropped = []
        if self.policy.keeps_nothing:                   # on-demand: nothing survives a visit
            dropped = list(resident)
            self.low.difference_update(dropped)
            self.stats.evictions += len(resident)
            resident.clear()
        self.policy.enter(t, v)
        self._settle_prefetches(layer, needed)
        want = [(layer, e) for e in sorted(needed)]
        members = set(resident)
        have = [k for k in want if k in members]
        todo = [k for k in want if k not in members]
        s = self.stats
        s.hits += len(have)
        s.misses += len(todo)
        s.per_layer[layer][0] += len(have)
        s.per_layer[layer][1] += len(todo)
        for k in have:
            self.stale.discard(k)
        host, low = self._serve_misses(v, todo)
        todo = [k for k in todo if k not in host]
        rounds, keys = [], have
        while True:
            chunk, todo = todo[:cap - len(keys)], todo[cap - len(keys):]
            loads = self._load_into(t, part, chunk, protect=set(keys), kind="demand",
                                    round_=len(rounds), low=low)
            keys = keys + chunk
            rounds.append(Round(loads, frozenset(e for _, e in keys)))
            if not todo:
                break
            keys = []
        s.extra_rounds += len(rounds) - 1
        prefetch = self._prefetch(t, v, self.policy.prefetch(t, v), round_=0)
        if host and self.misses.spec.fill:
            fills = self._prefetch(t, v, sorted(host), round_=0)
            prefetch += [load._replace(kind="fill") for load in fills]
        if self.misses is not None and self.misses.spec.upgrade:
            ups = [Load(t, k, None, "upgrade", 0) for k in sorted(low) if k in self.low]
            self.low.difference_update(u.key for u in ups)
            s.upgrades += len(ups)
            self.loads.extend(ups)
            prefetch = ups + prefetch
        self.policy.observe(t, v)
        return Plan(rounds, prefetch, dropped, frozenset(e for _, e in host))

    def _serve_misses(self, v: Visit, todo: list[Key]) -> tuple[set, set]:
        """The missed keys computed on the host and those loaded at low precision (the rule's
        decisions; both empty without a rule)."""
        if self.misses is None or not todo:
            return set(), set()
        rows = dict(v.rows or ())
        options = self.misses.assign({k[1]: rows.get(k[1], 1) for k in todo})
        choice = {k: options[k[1]] for k in todo}
        host = {k for k, c in choice.items() if c == "host"}
        low = {k for k, c in choice.items() if c == "low"}
        self.stats.served_host += len(host)
        self.stats.served_low += len(low)
        return host, low

    # -- internals ----------------------------------------------------------------------------------
    def _settle_prefetches(self, layer: int, needed: frozenset) -> None:
        for key in [k for k in self.pending if k[0] == layer]:
            self.pending.discard(key)
            if key[1] in needed:
                self.stats.prefetch_used += 1
                self.stats.per_layer[layer][3] += 1
            else:
                self._waste(key)
                self.stale.add(key)

    def _waste(self, key: Key) -> None:
        self.stats.prefetch_wasted += 1
        self.stats.per_layer[key[0]][4] += 1

    def _choose(self, t: int, candidates: list[Key], count: int, incoming=None) -> list[Key]:
        """Victims: stale prefetches first, then the policy's choice."""
        stale = sorted(k for k in candidates if k in self.stale)[:count]
        rest = [k for k in candidates if k not in self.stale]
        chosen = self.policy.victims(t, rest, count - len(stale), incoming) if count > len(stale) \
            else []
        if len(set(chosen)) != len(chosen) or not set(chosen) <= set(rest) or \
                (incoming is None and len(chosen) != count - len(stale)):
            raise RuntimeError(f"{self.policy.name} chose invalid victims {chosen} "
                               f"from {rest} (wanted {count - len(stale)})")
        return stale + chosen

    def _evict(self, part, key: Key) -> None:
        self.resident[part].remove(key)
        self.stats.evictions += 1
        self.stale.discard(key)
        self.low.discard(key)
        if key in self.pending:
            self.pending.discard(key)
            self._waste(key)

    def _load_into(self, t, part, keys: list[Key], protect: set, kind: str, round_: int,
                   low: set = frozenset()):
        """Demand loads of `keys` into partition `part`, evicting non-protected residents; the
        keys in `low` load their low-precision copy."""
        resident = self.resident[part]
        short = len(keys) - (self.capacity[part] - len(resident))
        victims = []
        if short > 0:
            victims = self._choose(t, [k for k in resident if k not in protect], short)
        loads = []
        for i, key in enumerate(keys):
            victim = victims[i - (len(keys) - len(victims))] \
                if i >= len(keys) - len(victims) else None
            if victim is not None:
                self._evict(part, victim)
            resident.append(key)
            if key in low:
                self.low.add(key)
            loads.append(Load(t, key, victim, "low" if key in low else kind, round_))
        assert len(resident) <= self.capacity[part]
        self.loads.extend(loads)
        return loads

    def _prefetch(self, t, v: Visit, keys, round_: int) -> list[Load]:
        """Prefetches may replace the current layer's experts: the copy lands after the layer's
        compute has read them (the engine's slot update is ordered after it)."""
        loads = []
        members: dict = {}           # part -> set of its residents (fresh ones included)
        candidates: dict = {}        # part -> residents not in flight, in resident order
        for key in keys:
            part = self._part(key[0])
            resident = self.resident[part]
            if part not in members:
                members[part] = set(resident)
            if key in members[part]:
                continue
            victim = None
            if len(resident) >= self.capacity[part]:
                if part not in candidates:
                    candidates[part] = [k for k in resident if k not in self.pending]
                chosen = self._choose(t, list(candidates[part]), 1, incoming=key)
                if not chosen:
                    break                                 # the policy keeps what it has
                victim = chosen[0]
                self._evict(part, victim)
                members[part].discard(victim)
                candidates[part].remove(victim)
            resident.append(key)
            members[part].add(key)
            self.pending.add(key)
            self.stats.prefetches += 1
            self.stats.per_layer[key[0]][2] += 1
            loads.append(Load(t, key, victim, "prefetch", round_))
        self.loads.extend(loads)
        return loads

    def place(self, key: Key) -> None:
        """Key is resident from the start (a preloaded pool): no access, load or prefetch."""
        part = self._part(key[0])
        if len(self.resident[part]) >= self.capacity[part]:
            raise ValueError(f"cannot place {key}: its partition holds {self.capacity[part]} "
                             "experts already")
        if key not in self.resident[part]:
            self.resident[part].append(key)

    def residents(self) -> set[Key]:
        return {k for part in self.resident.values() for k in part}


def belady_bound(stream: list[Visit], slots: int) -> CacheStats:
    """Fewest loads of any policy with `slots` slots on `stream` that serves each visit's
    experts together: Belady on the relaxed one-expert-at-a-time stream (see the module
    docstring). Counts hits and misses. A policy running visits in rounds picks the order within
    a visit and can beat it by up to one load per extra round (tests/offload/test_policies.py)."""
    stats = CacheStats()
    stats.misses = len(belady_misses(stream, slots))
    stats.hits = sum(len(Visit(*v).needed) for v in stream) - stats.misses
    return stats


def belady_misses(stream: list[Visit], slots: int) -> list[tuple[int, Key]]:
    """(visit index, key) of every miss Belady leaves on `stream` with `slots` slots."""
    uses: dict = defaultdict(list)
    stream = [Visit(*v) for v in stream]
    for t, v in enumerate(stream):
        for e in v.needed:
            uses[v.layer, e].append(t)

    def next_use(key, t):
        i = bisect.bisect_right(uses[key], t)
        return uses[key][i] if i < len(uses[key]) else float("inf")

    def victim_order(key, t):
        # furthest next use first; between experts next needed by the same visit, the one
        # needed again soonest after it: that visit serves the resident one first and loads
        # the other last, so the one loaded (and kept) should be the one needed soonest
        first = next_use(key, t)
        return first, -next_use(key, first), key

    resident: set = set()
    out = []
    for t, v in enumerate(stream):
        keys = [(v.layer, e) for e in sorted(v.needed)]
        misses = sorted((k for k in keys if k not in resident), key=lambda k: -next_use(k, t))
        out.extend((t, k) for k in misses)
        for key in misses:
            if len(resident) >= slots:
                resident.remove(max(resident, key=lambda r: victim_order(r, t)))
            resident.add(key)
    return out


def forward_groups(trace, batch: int | None) -> list[np.ndarray]:
    """Row indices of each forward: as recorded (`batch` None) or `batch` rows at a time."""
    if batch is None:
        bounds = np.flatnonzero(np.diff(trace.forward)) + 1
        return np.split(np.arange(len(trace)), bounds)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, found {batch}")
    return [np.arange(s, min(s + batch, len(trace))) for s in range(0, len(trace), batch)]


def stream_from_trace(trace, batch: int | None = None, forecaster=None,
                      lookahead=None) -> list[Visit]:
    """Visits of a trace replayed in order: for each forward (as recorded, or `batch` rows at a
    time), each MoE layer with the union of the experts its tokens picked, the union of the
    tokens' pre-gate predictions (where the trace has them), at the first MoE layer the
    forecaster's (L_moe, E) forecast for those rows (where one is given), and the lookahead
    heads' hints from the rows' recorded hidden states (where heads are given). A forward
    visits only the layers its rows ran (`Trace.layer_mask`: an encoder-decoder's encoder pass
    its encoder layers, a decoder step its decoder layers), and its first such visit carries
    the forecast."""
    stream, ran_by_row = [], trace.layer_mask()
    for f, rows in enumerate(forward_groups(trace, batch)):
        forecast = None if forecaster is None else np.asarray(forecaster.for_rows(trace, rows))
        ahead = None if lookahead is None else lookahead.for_rows(trace, rows)
        ran = [li for li in range(len(trace.moe_layers)) if ran_by_row[rows, li].any()]
        for n, li in enumerate(ran):
            layer = trace.moe_layers[li]
            needed = frozenset(int(e) for e in trace.experts[rows, li].ravel() if e >= 0)
            pregate = None
            if trace.pregate is not None and li + 1 in ran:
                pregate = frozenset(int(e) for e in trace.pregate[rows, li + 1].ravel() if e >= 0)
            hints = None if ahead is None else {trace.moe_layers[li + o]: p
                                                for o, p in ahead[li].items()}
            stream.append(Visit(layer, needed, f, pregate, forecast if n == 0 else None,
                                len(rows), hints, expert_rows(trace.experts[rows, li])))
    return stream
