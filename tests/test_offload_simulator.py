"""Replay simulator: counts from the cache core, a consistent time model, bounds."""

import numpy as np
import pytest

from moex.model import forward
from moex.offload.policies import CacheCore, make_policy, stream_from_trace
from moex.offload.simulator import ComputeModel, TransferModel, simulate
from moex.offload.trace import TraceRecorder
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
