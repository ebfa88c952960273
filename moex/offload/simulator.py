"""Replay a routing trace under a cache policy and budget, with a transfer and a compute model.

    result = simulate(trace, "lru", slots=16, batch=8, expert_bytes=..., transfer=TransferModel(),
                      compute=ComputeModel(seconds_per_layer=...))

Hits, misses and prefetches come from `CacheCore`, the bookkeeping the live engine uses, on the
stream `stream_from_trace` builds (forwards as recorded when `batch` is None). Time model: one
copy engine serves copies in issue order (latency + bytes / bandwidth each). A forward's
admission prefetches are issued when it starts; at a layer visit its demand loads are issued,
the layer waits until every expert it needs has arrived (stall; a prefetch still in flight
stalls too), computes (`ComputeModel.visit_seconds`; a visit served in rounds computes each
round's share after that round's loads), and the prefetches the policy asks for are issued as
its compute starts, so they overlap it. The run ends when compute and copies are both done.
With a miss rule (`moex.offload.misses.MissRule`): a low-precision load takes its own (smaller)
copy time, upgrades are copies issued with the prefetches, and a visit's host-computed experts
run on the host from the visit's start, in parallel with the device (the visit ends when both
are done; `host_s` sums the host's busy time).

The report gives the simulated tokens/s and its ceilings: compute-bound (no copies) and
transfer-bound (copies only); a measured number reads against min(compute-bound,
transfer-bound). `hidden_fraction` = 1 - stall / total copy time.
"""

from __future__ import annotations

import dataclasses

from moex.offload.cache import CacheCore, CacheStats, Visit, belady_misses, stream_from_trace
from moex.offload.policies import make_policy


@dataclasses.dataclass(frozen=True)
class TransferModel:
    bandwidth_bytes_per_s: float = 25e9     # PCIe 4.0 x16, effective
    latency_s: float = 10e-6                # per copy

    def copy_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    seconds_per_layer: float = 1e-3         # one MoE layer visit (and what runs before the next)
    seconds_per_token: float = 0.0          # added per token of the forward, per visit

    def visit_seconds(self, tokens: int) -> float:
        return self.seconds_per_layer + self.seconds_per_token * tokens


@dataclasses.dataclass
class SimResult:
    policy: str
    slots: int
    batch: int | None
    tokens: int
    stats: CacheStats
    bytes_moved: int
    copy_s: float
    compute_s: float
    stall_s: float
    total_s: float
    forward_ends: dict = dataclasses.field(default_factory=dict)  # forward -> its compute's end
    host_s: float = 0.0                     # host compute of host-served misses

    def seconds_after(self, forward: int) -> float:
        """Time from the end of `forward`'s compute to the end of the run (e.g. the decode
        steps after a prefill)."""
        return self.total_s - self.forward_ends[forward]

    @property
    def hits(self) -> int:
        return self.stats.hits

    @property
    def misses(self) -> int:
        return self.stats.misses

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else float("inf")

    @property
    def compute_bound_tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s else float("inf")

    @property
    def transfer_bound_tokens_per_s(self) -> float:
        return self.tokens / self.copy_s if self.copy_s else float("inf")

    @property
    def bound_tokens_per_s(self) -> float:
        return min(self.compute_bound_tokens_per_s, self.transfer_bound_tokens_per_s)

    @property
    def hidden_fraction(self) -> float:
        return 1.0 - self.stall_s / self.copy_s if self.copy_s else 1.0


class _CopyEngine:
    def __init__(self, transfer: TransferModel, expert_bytes: int, low_bytes: int = 0):
        self.seconds = {False: transfer.copy_seconds(expert_bytes),
                        True: transfer.copy_seconds(low_bytes)}
        self.nbytes = {False: expert_bytes, True: low_bytes}
        self.free_at, self.ready, self.busy, self.moved = 0.0, {}, 0.0, 0

    def issue(self, loads, now: float) -> None:
        for load in loads:
            low = load.kind == "low"
            self.free_at = max(self.free_at, now) + self.seconds[low]
            self.ready[load.key] = self.free_at
            self.busy += self.seconds[low]
            self.moved += self.nbytes[low]


def simulate(trace, policy: str, slots: int, batch: int | None, expert_bytes: int,
             transfer: TransferModel = TransferModel(), compute: ComputeModel = ComputeModel(),
             forecaster=None, lookahead=None, misses=None) -> SimResult:
    """Replay `trace` under `policy`; `lookahead`: trained heads (`moex.predict.lookahead.
    LookaheadHints`) for the lookahead policy and for predictive's combined form; `misses`: a
    `MissRule` (expert_bytes is then the stored copy's size, as the rule's)."""
    p = make_policy(policy, lookahead is not None)
    if p.uses_pregate and trace.pregate is None:
        raise ValueError(f"{policy} needs pre-gate predictions, and this trace (recorded on "
                         f"{trace.model}) has none: record it with the offload engine")
    if p.uses_forecast and forecaster is None:
        raise ValueError(f"{policy} needs a forecaster (moex.offload.forecast)")
    if p.uses_lookahead and (lookahead is None or trace.hidden is None):
        raise ValueError(f"{policy} needs lookahead heads and a trace with hidden states "
                         f"(`moex lm trace --hidden`); {trace.model}'s trace has "
                         f"{'none' if trace.hidden is None else 'them'}")
    stream = stream_from_trace(trace, batch, forecaster if p.uses_forecast else None,
                               lookahead if p.uses_lookahead else None)
    return simulate_stream(stream, policy, slots, trace.moe_layers, trace.num_experts,
                           expert_bytes, transfer, compute, tokens=len(trace), batch=batch,
                           lookahead=p.uses_lookahead, misses=misses)


def simulate_stream(stream, policy: str, slots: int, layers: list[int], num_experts: int,
                    expert_bytes: int, transfer: TransferModel = TransferModel(),
                    compute: ComputeModel = ComputeModel(), tokens: int | None = None,
                    batch: int | None = None, lookahead: bool = False,
                    misses=None, dequant_s: float = 0.0) -> SimResult:
    """The time model on a stream of visits (`simulate` builds one from a trace); `tokens`
    defaults to the sum of each forward's tokens; `lookahead`: the stream carries lookahead
    hints (predictive then runs combined); `misses`: a MissRule; `dequant_s`: compute added per
    expert a visit needs (quantized slots dequantize at every use)."""
    p = make_policy(policy, lookahead)
    core = CacheCore(p, slots, layers, num_experts, misses=misses)
    minimum = core.minimum_slots(stream)
    if slots < minimum:
        raise ValueError(f"budget of {slots} expert slots is below the minimum of {minimum} "
                         f"for policy {policy}")
    p.start(stream, slots, layers)
    copies = _CopyEngine(transfer, expert_bytes, misses.costs.low_bytes if misses else 0)
    now = stall = busy = host_busy = 0.0
    ends = {}
    for t, v in enumerate(stream):
        if v.forecast is not None:
            copies.issue(core.admit(t, v), now)
        plan = core.visit(t, v)
        seconds = compute.visit_seconds(v.tokens) + dequant_s * len(v.needed)
        rows = dict(v.rows or ())
        host_s = sum(misses.costs.seconds("host", rows.get(e, 1)) for e in plan.host) \
            if plan.host else 0.0
        host_done = now + host_s
        host_busy += host_s
        for i, r in enumerate(plan.rounds):
            copies.issue(r.loads, now)
            arrived = max([copies.ready.get((v.layer, e), 0.0) for e in r.experts] + [now])
            stall += arrived - now
            now = arrived
            if i == len(plan.rounds) - 1:
                copies.issue(plan.prefetch, now)
            share = seconds * len(r.experts) / len(v.needed) if len(plan.rounds) > 1 else seconds
            now += share
            busy += share
        if host_done > now:                         # the device waits for the host's pairs
            stall += host_done - now
            now = host_done
        ends[v.forward] = now
    core.finish()
    if tokens is None:
        tokens = sum(v.tokens for v in stream if v.layer == layers[0])
    return SimResult(policy=policy, slots=slots, batch=batch, tokens=tokens, stats=core.stats,
                     bytes_moved=copies.moved, copy_s=copies.busy, compute_s=busy,
                     stall_s=stall, total_s=max(now, copies.free_at), forward_ends=ends,
                     host_s=host_busy)


@dataclasses.dataclass(frozen=True)
class MissBound:
    """The fastest any policy could run `stream` with `slots` slots: Belady's misses, each at
    its cheapest option (the stored copy over the link, the low-precision copy, or the host's
    compute for its rows, as the rule allows), against the device's compute; copies and compute
    overlap perfectly, so the time is the larger of the two."""
    misses: int
    miss_s: float
    compute_s: float
    tokens: int

    @property
    def seconds(self) -> float:
        return max(self.miss_s, self.compute_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("inf")


def miss_bound(stream, slots: int, expert_bytes: int, transfer: TransferModel = TransferModel(),
               compute: ComputeModel = ComputeModel(), misses=None,
               tokens: int | None = None, left: list | None = None,
               dequant_s: float = 0.0) -> MissBound:
    """MissBound of a stream (`misses`: the MissRule whose options a miss may take; `left`:
    `belady_misses(stream, slots)` when already computed; `dequant_s` as in simulate_stream)."""
    stream = [Visit(*v) for v in stream]
    cost = {"load": lambda rows: transfer.copy_seconds(expert_bytes)}
    if misses is not None and misses.spec.low is not None:
        cost["low"] = lambda rows: transfer.copy_seconds(misses.costs.low_bytes)
    if misses is not None and misses.spec.host:
        cost["host"] = lambda rows: misses.costs.seconds("host", rows)
    left = belady_misses(stream, slots) if left is None else left
    miss_s = sum(min(f(dict(stream[t].rows or ()).get(key[1], 1)) for f in cost.values())
                 for t, key in left)
    first = stream[0].layer if stream else None
    if tokens is None:
        tokens = sum(v.tokens for v in stream if v.layer == first)
    return MissBound(len(left), miss_s, sum(compute.visit_seconds(v.tokens)
                                            + dequant_s * len(v.needed) for v in stream), tokens)
