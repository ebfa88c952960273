"""Cache policies: LRU / LFU against brute-force references, Belady bounds every policy's loads,
prefetch accounting, PLEC quotas, rounds, budget minimum, and streams from recorded traces."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.offload.cache import CacheCore, Visit, belady_bound, stream_from_trace
from moex.offload.policies import POLICIES, Predictive, make_policy

LAYERS = [0, 2]


def streams(max_experts=6, max_need=3):
    visit = st.frozensets(st.integers(0, max_experts - 1), min_size=1, max_size=max_need)
    # a forward visits every MoE layer in order
    return st.lists(st.tuples(*[visit for _ in LAYERS]), min_size=1, max_size=12).map(
        lambda fwd: [(l, needed) for step in fwd for l, needed in zip(LAYERS, step)])


def run(name, stream, slots, experts=6, rounds=True):
    core = CacheCore(make_policy(name), slots, LAYERS, experts, rounds)
    return core.run(stream)


def with_hints(stream, seed, experts=6):
    """The stream with random pre-gate hints and a random forecast at each forward's start."""
    rng = np.random.default_rng(seed)
    out = []
    for t, (layer, needed) in enumerate(stream):
        first = layer == LAYERS[0]
        out.append(Visit(layer, needed, t // len(LAYERS),
                         frozenset(rng.choice(experts, 2, replace=False).tolist()),
                         rng.random((len(LAYERS), experts)) * (rng.random() < 0.9) if first
                         else None))
    return out


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
@given(stream=streams(), extra=st.integers(0, 6), seed=st.integers(0, 10**6))
def test_lru_lfu_match_brute_force_and_belady_bounds_all(stream, extra, seed):
    need = max(len(n) for _, n in stream)
    slots = need * len(LAYERS) + extra                  # enough for every per-layer share
    lru, lfu = run("lru", stream, slots), run("lfu", stream, slots)
    assert lru.hits == lru_brute_force(stream, slots)
    assert lfu.hits == lfu_brute_force(stream, slots)
    hinted = with_hints(stream, seed)
    best = run("belady", hinted, slots)
    for name in ("on-demand", "lru", "lfu", "pregated", "predictive"):
        stats = run(name, hinted, slots)
        assert stats.extra_rounds == 0
        assert best.misses <= stats.loads, name           # Belady loads least ...
        assert best.hit_rate >= stats.reuse_rate, name    # ... so its hit rate bounds reuse
        assert stats.prefetch_used + stats.prefetch_wasted == stats.prefetches, name
        if not make_policy(name).uses_pregate and not make_policy(name).uses_forecast:
            assert stats.prefetches == 0 and stats.hit_rate == stats.reuse_rate
    assert run("on-demand", stream, slots).hits == 0


def test_pregated_prefetch_used_and_wasted():
    # forward 0: layer 0 predicts {1, 2} for layer 2, which needs {1, 3}
    stream = [Visit(0, frozenset({0}), 0, frozenset({1, 2})), Visit(2, frozenset({1, 3}), 0),
              Visit(0, frozenset({0}), 1, frozenset({3})), Visit(2, frozenset({3}), 1)]
    stats = run("pregated", stream, 4)
    # t0: miss 0, prefetch (2,1) (2,2). t1: hit 1 (used), 2 wasted (stale), miss 3
    # t2: hit 0, (2,3) resident already -> no prefetch. t3: hit 3.
    assert (stats.hits, stats.misses, stats.prefetches) == (3, 2, 2)
    assert (stats.prefetch_used, stats.prefetch_wasted) == (1, 1)
    assert stats.per_layer[2] == [2, 1, 2, 1, 1]


def test_stale_prefetches_are_evicted_first():
    # 3 slots. t0 prefetches (2,1), (2,2); t1 needs only 1, so (2,2) turns stale; t2 (layer 0,
    # needs {4, 5}) must evict: the stale (2,2) goes first though (0,0) was used less recently
    stream = [Visit(0, frozenset({0}), 0, frozenset({1, 2})), Visit(2, frozenset({1}), 0),
              Visit(0, frozenset({0, 5}), 1)]
    core = CacheCore(make_policy("pregated"), 3, LAYERS, 6)
    core.run(stream)
    assert core.loads[-1].key == (0, 5) and core.loads[-1].victim == (2, 2)


def test_plec_quotas_follow_predicted_demand():
    p = Predictive()
    p.start([], 6, LAYERS)
    forecast = np.array([[0.9, 0.9, 0.9, 0.9, 0.1, 0.0],     # demand 3.7
                         [1.0, 0.8, 0.0, 0.0, 0.0, 0.0]])    # demand 1.8, two experts possible
    assert p.quotas(forecast).tolist() == [4, 2]
    plan = p.admit(0, Visit(0, frozenset(), 0, None, forecast))
    assert plan == [(0, 0), (0, 1), (0, 2), (0, 3), (2, 0), (2, 1)]
    assert p.quotas(np.zeros((2, 6))).tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"forecast has shape \(3, 6\), expected \(2, E\)"):
        p.admit(0, Visit(0, frozenset(), 0, None, np.zeros((3, 6))))
    with pytest.raises(ValueError, match="predictive needs a forecast"):
        run("predictive", [Visit(0, frozenset({1}))], 4)


def test_plec_recycles_finished_layers_and_keeps_planned_ones():
    forecast = np.array([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]])
    # 2 slots: admission prefetches (0,0) and (2,1); both used
    stream = [Visit(0, frozenset({0}), 0, None, forecast), Visit(2, frozenset({1}), 0)]
    stats = run("predictive", stream, 2)
    assert (stats.hits, stats.misses, stats.prefetch_used) == (2, 0, 2)
    # 1 slot: (0,0) is admitted; (2,1) waits until layer 0 is done, then recycles its slot
    core = CacheCore(make_policy("predictive"), 1, LAYERS, 6)
    stats = core.run(stream)
    assert (stats.hits, stats.misses, stats.prefetches) == (2, 0, 2)
    assert [(l.key, l.victim, l.round) for l in core.loads] == [((0, 0), None, -1),
                                                                ((2, 1), (0, 0), 0)]


@settings(max_examples=60, deadline=None)
@given(stream=streams(max_need=5), slots=st.integers(2, 5),
       name=st.sampled_from(["on-demand", "lru", "lfu", "pregated", "belady"]))
def test_rounds_serve_any_budget_of_one_slot_per_partition(stream, slots, name):
    """A visit needing more experts than its partition holds runs in rounds: each round fits,
    rounds partition the needed experts, and the resident set never exceeds the partition."""
    stream = [Visit(*v) for v in stream]
    core = CacheCore(make_policy(name), slots, LAYERS, 6)
    core.policy.start(stream, slots, LAYERS)
    for t, v in enumerate(stream):
        plan = core.visit(t, Visit(*v))
        part = core._part(v[0])
        cap = core.capacity[part]
        assert all(len(r.experts) <= cap for r in plan.rounds)
        assert frozenset().union(*(r.experts for r in plan.rounds)) == v[1]
        assert sum(len(r.experts) for r in plan.rounds) == len(v[1])
        assert len(plan.rounds) == 1 or len(v[1]) > cap
        assert len(core.resident[part]) <= cap


def test_all_resident_hits_everything_after_first_use():
    stream = [(0, frozenset({1, 2})), (2, frozenset({0})), (0, frozenset({1, 3}))]
    stats = run("all-resident", stream, 12)
    assert (stats.hits, stats.misses) == (1, 4)
    with pytest.raises(ValueError, match="all-resident needs 12 expert slots, the budget gives 11"):
        run("all-resident", stream, 11)


def test_budget_below_minimum_states_it():
    stream = [(0, frozenset({1, 2, 3})), (2, frozenset({0}))]
    with pytest.raises(ValueError, match="below the minimum of 6 for policy lru"):
        run("lru", stream, 5, rounds=False)
    with pytest.raises(ValueError, match="below the minimum of 3 for policy belady"):
        run("belady", stream, 2, rounds=False)
    with pytest.raises(ValueError, match=r"below the minimum of 2 for policy lfu .*one slot per"):
        run("lfu", stream, 1)
    assert run("lru", stream, 2).extra_rounds == 2       # 3 experts through 1 slot: 3 rounds
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
    assert len(stream) == 2 * -(-len(trace) // 4) and [v.layer for v in stream[:2]] == [0, 1]
    first = set(trace.experts[:4, 0].ravel().tolist())
    assert stream[0].needed == frozenset(first) and stream[0].tokens == 4
    assert len(stream_from_trace(trace)) == 2                   # as recorded: one forward
    stats = {n: CacheCore(make_policy(n), 8, trace.moe_layers, 4).run(stream).hits
             for n in POLICIES if n not in ("pregated", "predictive")}
    assert stats["belady"] >= max(stats["lru"], stats["lfu"], stats["on-demand"])


@settings(max_examples=150, deadline=None)
@given(stream=streams(max_need=5), slots=st.integers(2, 9), seed=st.integers(0, 10**6))
def test_relaxed_belady_bounds_every_policy_at_any_budget(stream, slots, seed):
    """No policy that serves each visit whole loads less than the bound. One that runs visits
    in rounds chooses the order within a visit, and each extra round can save at most one load
    against the bound (test_rounds_can_beat_the_relaxed_bound shows one)."""
    hinted = with_hints(stream, seed)
    bound = belady_bound(hinted, slots)
    assert bound.hits + bound.misses == sum(len(v[1]) for v in stream)
    for name in ("on-demand", "lru", "lfu", "pregated", "predictive", "belady"):
        r = run(name, hinted, slots)
        assert bound.misses <= r.loads + r.extra_rounds, name
        if not r.extra_rounds:
            assert bound.misses <= r.loads, name


def test_rounds_can_beat_the_relaxed_bound():
    """2 slots, LRU's one per layer, so every visit of several experts runs in rounds: LRU
    serves the resident expert first and loads the others after it, and the last one loaded
    stays for the next visit -- 14 loads against the relaxed bound's 15 (found by hypothesis)."""
    stream = [(0, frozenset({0})), (2, frozenset({0, 1, 2, 5})), (0, frozenset({2})),
              (2, frozenset({0, 1, 5})), (0, frozenset({0, 1, 2})), (2, frozenset({0, 1, 2, 5})),
              (0, frozenset({0, 1})), (2, frozenset({5}))]
    lru = run("lru", with_hints(stream, 0), 2)
    assert (lru.loads, lru.extra_rounds, belady_bound(stream, 2).misses) == (14, 11, 15)


def test_relaxed_belady_by_hand():
    # 1 slot. t0: load 0. t1: 0 is a hit (served first), then 1 is loaded over it. t2: 0 and 2
    # both miss. Served all at once (no rounds), 1 slot could not even hold t1's two experts.
    stream = [(0, frozenset({0})), (0, frozenset({0, 1})), (0, frozenset({0, 2}))]
    assert (lambda s: (s.hits, s.misses))(belady_bound(stream, 1)) == (1, 4)
    # 2 slots: t1 keeps 0 and 1; at t2, 1 (never needed again) makes room for 2
    assert (lambda s: (s.hits, s.misses))(belady_bound(stream, 2)) == (2, 3)
    # the missing expert needed again soonest is loaded last, so it stays
    stream = [(0, frozenset({1, 2})), (0, frozenset({2}))]
    assert (lambda s: (s.hits, s.misses))(belady_bound(stream, 1)) == (1, 2)
