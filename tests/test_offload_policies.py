"""Cache policies: LRU / LFU against brute-force references, Belady bounds every demand policy,
budget minimum, and streams from recorded traces."""

from collections import defaultdict

import pytest
from hypothesis import given, settings, strategies as st

from moex.offload.policies import CacheCore, POLICIES, make_policy, stream_from_trace

LAYERS = [0, 2]


def streams(max_experts=6, max_need=3):
    visit = st.frozensets(st.integers(0, max_experts - 1), min_size=1, max_size=max_need)
    # a forward visits every MoE layer in order
    return st.lists(st.tuples(*[visit for _ in LAYERS]), min_size=1, max_size=12).map(
        lambda fwd: [(l, needed) for step in fwd for l, needed in zip(LAYERS, step)])


def run(name, stream, slots, experts=6):
    core = CacheCore(make_policy(name), slots, LAYERS, experts)
    return core.run(stream)


def lru_brute_force(stream, slots):
    """Per layer, the resident set before a visit is the C most recently used experts."""
    cap = {l: slots // len(LAYERS) + (i < slots % len(LAYERS)) for i, l in enumerate(LAYERS)}
    hits = 0
    for t, (layer, needed) in enumerate(stream):
        last = {}
        for u, (l, n) in enumerate(stream[:t]):
            if l == layer:
                last.update({e: u for e in n})
        resident = sorted(last, key=lambda e: (-last[e], -e))[:cap[layer]]
        hits += len(needed & set(resident))
    return hits


def lfu_brute_force(stream, slots):
    """A plain list simulation: evict min (uses so far, last use, expert) among non-needed."""
    cap = {l: slots // len(LAYERS) + (i < slots % len(LAYERS)) for i, l in enumerate(LAYERS)}
    cache = {l: [] for l in LAYERS}
    hits = 0
    for t, (layer, needed) in enumerate(stream):
        history = [(u, n) for u, (l, n) in enumerate(stream[:t]) if l == layer]
        uses = lambda e: sum(e in n for _, n in history)
        last = lambda e: max([u for u, n in history if e in n], default=-1)
        hits += len(needed & set(cache[layer]))
        for e in sorted(needed - set(cache[layer])):
            if len(cache[layer]) == cap[layer]:
                victim = min((x for x in cache[layer] if x not in needed),
                             key=lambda x: (uses(x), last(x), x))
                cache[layer].remove(victim)
            cache[layer].append(e)
    return hits


@settings(max_examples=150, deadline=None)
@given(stream=streams(), extra=st.integers(0, 6))
def test_lru_lfu_match_brute_force_and_belady_bounds_all(stream, extra):
    need = max(len(n) for _, n in stream)
    slots = need * len(LAYERS) + extra                  # enough for every per-layer share
    lru, lfu = run("lru", stream, slots), run("lfu", stream, slots)
    assert lru.hits == lru_brute_force(stream, slots)
    assert lfu.hits == lfu_brute_force(stream, slots)
    best = run("belady", stream, slots)
    for name in ("on-demand", "lru", "lfu"):
        assert best.hits >= run(name, stream, slots).hits, name
    assert run("on-demand", stream, slots).hits == 0


def test_all_resident_hits_everything_after_first_use():
    stream = [(0, frozenset({1, 2})), (2, frozenset({0})), (0, frozenset({1, 3}))]
    stats = run("all-resident", stream, 12)
    assert (stats.hits, stats.misses) == (1, 4)
    with pytest.raises(ValueError, match="all-resident needs 12 expert slots, the budget gives 11"):
        run("all-resident", stream, 11)


def test_budget_below_minimum_states_it():
    stream = [(0, frozenset({1, 2, 3})), (2, frozenset({0}))]
    with pytest.raises(ValueError, match="below the minimum of 6 for policy lru"):
        run("lru", stream, 5)
    with pytest.raises(ValueError, match="below the minimum of 3 for policy belady"):
        run("belady", stream, 2)
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        make_policy("fifo")


def test_stream_from_recorded_trace(tmp_path):
    import numpy as np
    from moex.model import forward
    from moex.offload.trace import TraceRecorder
    from moex.tokenizer import ByteTokenizer
    from tests.helpers import tiny
    cfg, model, params = tiny("tiny-hard")
    ids, mask = ByteTokenizer().batch(["routing traces", "replay"])
    _, _, aux = forward(model, params, ids, mask)
    rec = TraceRecorder(cfg)
    rec.add(aux, mask, [0, 1], np.maximum(np.cumsum(mask, 1) - 1, 0), 0)
    trace = rec.trace()
    stream = stream_from_trace(trace, batch=4)
    assert len(stream) == 2 * -(-len(trace) // 4) and [l for l, _ in stream[:2]] == [0, 1]
    first = set(trace.experts[:4, 0].ravel().tolist())
    assert stream[0][1] == frozenset(first)
    stats = {n: CacheCore(make_policy(n), 8, trace.moe_layers, 4).run(stream).hits
             for n in POLICIES}
    assert stats["belady"] >= max(stats["lru"], stats["lfu"], stats["on-demand"])
