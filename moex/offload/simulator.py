"""Replay a routing trace under a cache policy and budget, with a transfer and a compute model.

    result = simulate(trace, "lru", slots=16, batch=8, expert_bytes=..., transfer=TransferModel(),
                      compute=ComputeModel(seconds_per_layer=...))

Hits and misses come from `CacheCore`, the same bookkeeping the live engine uses. Time model
(demand policies): before a layer visit computes, its missing experts are copied host -> device,
one copy each (latency + bytes / bandwidth), and the layer waits for them (stall); then it
computes for `seconds_per_layer`. The report gives the simulated tokens/s and the two ceilings,
compute-bound (no copies) and transfer-bound (copies only); a measured number reads against
min(compute-bound, transfer-bound).
"""

from __future__ import annotations

import dataclasses

from moex.offload.policies import CacheCore, make_policy, stream_from_trace


@dataclasses.dataclass(frozen=True)
class TransferModel:
    bandwidth_bytes_per_s: float = 25e9     # PCIe 4.0 x16, effective
    latency_s: float = 10e-6                # per copy

    def copy_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    seconds_per_layer: float = 1e-3         # one MoE layer visit (one forward of the batch)


@dataclasses.dataclass
class SimResult:
    policy: str
    slots: int
    batch: int
    tokens: int
    hits: int
    misses: int
    bytes_moved: int
    compute_s: float
    stall_s: float

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.stall_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else float("inf")

    @property
    def compute_bound_tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s else float("inf")

    @property
    def transfer_bound_tokens_per_s(self) -> float:
        return self.tokens / self.stall_s if self.stall_s else float("inf")

    @property
    def bound_tokens_per_s(self) -> float:
        return min(self.compute_bound_tokens_per_s, self.transfer_bound_tokens_per_s)


def simulate(trace, policy: str, slots: int, batch: int, expert_bytes: int,
             transfer: TransferModel = TransferModel(),
             compute: ComputeModel = ComputeModel()) -> SimResult:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, found {batch}")
    stream = stream_from_trace(trace, batch)
    core = CacheCore(make_policy(policy), slots, trace.moe_layers, trace.num_experts)
    stats = core.run(stream)
    copy_s = transfer.copy_seconds(expert_bytes)
    return SimResult(policy=policy, slots=slots, batch=batch, tokens=len(trace),
                     hits=stats.hits, misses=stats.misses,
                     bytes_moved=len(core.loads) * expert_bytes,
                     compute_s=len(stream) * compute.seconds_per_layer,
                     stall_s=len(core.loads) * copy_s)
