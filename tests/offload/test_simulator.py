"""Replay simulator: counts from the cache core, a consistent time model (hand-computed overlap
of prefetches), bounds."""

import numpy as np
import pytest

from moex.model import forward
from moex.offload.cache import CacheCore, stream_from_trace
from moex.offload.forecast import OracleForecast, PriorForecast
from moex.offload.policies import make_policy
from moex.offload.simulator import ComputeModel, TransferModel, simulate
from moex.offload.trace import Trace, TraceRecorder
from moex.tokenizer import ByteTokenizer
from tests.helpers import tiny


@pytest.fixture(scope="module")
def trace():
    cfg, model, params = tiny("tiny-hard")
    ids, mask = ByteTokenizer().batch(["a longer prompt for routing", "short", "third row"])
    _, _, aux = forward(model, params, ids, mask)
    rec = TraceRecorder(cfg)
    rec.add(aux, mask, [0, 1, 2], np.maximum(np.cumsum(mask, 1) - 1, 0), 0)
    return rec.trace()


@pytest.mark.parametrize("policy", ["on-demand", "lru", "lfu", "belady"])
def test_counts_and_time_model(trace, policy):
    transfer, compute = TransferModel(1e9, 1e-5), ComputeModel(2e-3)
    r = simulate(trace, policy, slots=5, batch=1, expert_bytes=1_000_000, transfer=transfer,
                 compute=compute)
    stream = stream_from_trace(trace, 1)
    assert r.hidden_fraction == pytest.approx(0.0)              # demand copies always stall
    core = CacheCore(make_policy(policy), 5, trace.moe_layers, trace.num_experts)
    stats = core.run(stream)
    assert (r.hits, r.misses) == (stats.hits, stats.misses)
    assert r.bytes_moved == r.misses * 1_000_000               # demand policies load each miss
    assert r.compute_s == pytest.approx(len(stream) * 2e-3)
    assert r.stall_s == pytest.approx(r.misses * (1e-5 + 1e-3))
    assert r.tokens_per_s <= r.bound_tokens_per_s
    assert r.tokens == len(trace)


def test_belady_is_fastest_demand_policy(trace):
    rs = {p: simulate(trace, p, slots=5, batch=1, expert_bytes=10**6)
          for p in ("on-demand", "lru", "lfu", "belady")}
    assert rs["belady"].tokens_per_s >= max(r.tokens_per_s for r in rs.values())
    assert rs["belady"].hits > rs["on-demand"].hits == 0
    everything = simulate(trace, "all-resident", slots=8, batch=4, expert_bytes=10**6)
    assert everything.misses == len({(l, int(e)) for l_i, l in enumerate(trace.moe_layers)
                                     for e in trace.experts[:, l_i].ravel()})
    with pytest.raises(ValueError, match="batch must be >= 1"):
        simulate(trace, "lru", slots=6, batch=0, expert_bytes=1)


def hand_trace(pregate: bool) -> Trace:
    """2 MoE layers, 4 experts, top-1, two one-token forwards."""
    experts = np.array([[[0], [1]], [[0], [2]]], np.int16)           # (N=2, L=2, K=1)
    pre = np.array([[[-1], [1]], [[-1], [3]]], np.int16)              # layer 0 predicts 1, 3
    return Trace("hand", [0, 1], 4, 1, np.zeros(2, np.int32), np.arange(2, dtype=np.int32),
                 np.array([0, 1], np.int8), experts, np.full((2, 2, 4), 0.25, np.float16),
                 np.arange(2, dtype=np.int32), pre if pregate else None)


def test_prefetch_overlaps_compute_by_hand():
    """Copies take 1 s, a layer computes 2 s, 3 slots.
    pregated: t=0 miss (0,0): stall 1, compute [1, 3), prefetch (1,1) issued at 1 lands at 2;
    t=1 hit (1,1): no stall, compute [3, 5); prefetch of nothing for the last layer.
    t=2 hit (0,0), prefetch (1,3) issued at 5 over the LRU victim... lands at 6; compute [5, 7);
    t=3 needs (1,2), mispredicted: demand copy [7, 8), stall 1, compute [8, 10).
    Total 10 s, stall 2 s of 4 copies (4 s): half of the copy time hidden."""
    r = simulate(hand_trace(True), "pregated", slots=3, batch=None, expert_bytes=1,
                 transfer=TransferModel(bandwidth_bytes_per_s=1e9, latency_s=1.0 - 1e-9),
                 compute=ComputeModel(seconds_per_layer=2.0))
    assert (r.hits, r.misses, r.stats.prefetches) == (2, 2, 2)
    assert (r.stats.prefetch_used, r.stats.prefetch_wasted) == (1, 1)
    assert r.total_s == pytest.approx(10.0) and r.stall_s == pytest.approx(2.0)
    assert r.copy_s == pytest.approx(4.0) and r.hidden_fraction == pytest.approx(0.5)
    assert r.compute_s == pytest.approx(8.0)
    lru = simulate(hand_trace(True), "lru", slots=4, batch=None, expert_bytes=1,
                   transfer=TransferModel(1e9, 1.0 - 1e-9), compute=ComputeModel(2.0))
    assert lru.total_s == pytest.approx(8.0 + 3.0)             # 3 demand copies, all stalled


def test_prefetching_needs_its_hints(trace):
    with pytest.raises(ValueError, match="pregated needs pre-gate predictions"):
        simulate(trace, "pregated", slots=4, batch=1, expert_bytes=1)
    with pytest.raises(ValueError, match="predictive needs a forecaster"):
        simulate(trace, "predictive", slots=4, batch=1, expert_bytes=1)


def test_oracle_forecast_prefetches_everything_it_can(trace):
    r = simulate(trace, "predictive", slots=8, batch=2, expert_bytes=10**6,
                 forecaster=OracleForecast(trace))
    assert r.misses == 0 and r.stats.prefetch_wasted == 0     # all experts fit: all predicted
    prior = simulate(trace, "predictive", slots=4, batch=2, expert_bytes=10**6,
                     forecaster=PriorForecast.from_trace(trace))
    best = simulate(trace, "belady", slots=4, batch=2, expert_bytes=10**6)
    assert best.misses <= prior.stats.loads
