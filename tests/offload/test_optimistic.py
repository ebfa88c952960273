"""The engine's fast paths against its reference paths: optimistic dispatch with forced misses
(recomputed, bitwise equal to all-resident, one recompute per visit that read an unresident
expert), the fused whole-forward call against the same forward layer by layer, and the device
slot table under hand-built orders of copies and computes (it never sends a piece to a slot
whose weights are not the expert's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.nn.decoder import init_cache
from moex.offload.cache import CacheCore
from moex.offload.engine import DISPATCH
from moex.offload.forecast import OracleForecast
from moex.offload.policies import make_policy
from moex.offload.store import ExpertStore, SlotPool
from tests.offload.test_engine import (CFG, EXPERT_BYTES, NEW_TOKENS, PARAMS, TOTAL, engine,
                                       prompts, reference, run_reference)

__all__ = ["reference"]                     # the shared fixture of test_engine

LAYERS = ExpertStore.from_params(CFG, PARAMS).layers
EXPERTS = CFG.decoder.moe.num_experts


def missed_visits(eng) -> list[bool]:
    """Replays the engine's visit stream through a fresh cache core: whether each visit had
    a miss (in the per-layer path residency at dispatch is the core's, so these are the
    layers that read an unresident expert)."""
    core = CacheCore(make_policy(eng.policy.name), eng.pool.num_slots, eng.store.layers,
                     EXPERTS)
    flags = []
    for t, v in enumerate(eng.stream):
        before = core.stats.misses
        if v.forecast is not None:
            core.admit(t, v)
        core.visit(t, v)
        flags.append(core.stats.misses > before)
    return flags


def dispatch_counts(eng, dispatch: str, prompt_len: int) -> tuple[int, int]:
    """(recomputed, waited) visits that `dispatch` gives the engine's stream: 'optimistic'
    recomputes every visit that missed, 'wait' waits at every visit, 'adaptive' waits where
    the layer's previous visit of the same length (prefill or decode step) missed."""
    last, recomputed, waited = {}, 0, 0
    for v, miss in zip(eng.stream, missed_visits(eng)):
        key = (v.layer, prompt_len if v.forward == 0 else 1)
        wait = dispatch == "wait" or (dispatch == "adaptive" and last.get(key, False))
        waited += wait
        recomputed += miss and not wait
        last[key] = miss
    return recomputed, waited


def same_visits(a, b) -> bool:
    return [(v.layer, v.needed, v.forward, v.pregate, v.tokens, v.rows) for v in a] == \
        [(v.layer, v.needed, v.forward, v.pregate, v.tokens, v.rows) for v in b]


def test_deferred_visits_wait_for_the_next_forward_or_flush():
    """forward(defer=True) on a warm pool leaves its visits and trace rows pending; the next
    forward enters them (after dispatching its own call) and `flush` enters the last ones, in
    order, as an undeferred run would."""
    ids, mask = prompts(4, 2, 3)
    runs = {}
    for defer in (False, True):
        eng = engine("lru", TOTAL, warm=True)
        cache = init_cache(CFG.decoder, 2, 3 + 3, eng.dtype)
        logits, cache = eng.forward(ids, mask, cache, fresh_cache=True, last_only=True)
        seen = [len(eng.stream)]
        for _ in range(2):
            nxt = np.argmax(np.asarray(logits)[:, -1], -1).astype(np.int32)[:, None]
            logits, cache = eng.forward(nxt, np.ones_like(nxt), cache, defer=defer)
            seen.append(len(eng.stream))
        eng.flush()
        seen.append(len(eng.stream))
        runs[defer] = eng, seen, np.asarray(logits)
    (plain, seen_plain, logits_plain), (deferred, seen_deferred, logits_deferred) = \
        runs[False], runs[True]
    per = len(LAYERS)
    assert seen_plain == [per, 2 * per, 3 * per, 3 * per]
    assert seen_deferred == [per, per, 2 * per, 3 * per]
    assert same_visits(deferred.stream, plain.stream)
    np.testing.assert_array_equal(logits_deferred, logits_plain)
    np.testing.assert_array_equal(deferred.trace().experts, plain.trace().experts)
    assert deferred.stats.fused == plain.stats.fused == 3          # the prefill too


@pytest.mark.parametrize("dispatch", DISPATCH)
@pytest.mark.parametrize("policy, slots", [("on-demand", EXPERTS), ("lru", len(LAYERS)),
                                           ("lru", EXPERTS)])
def test_forced_misses_recompute_bitwise(reference, policy, slots, dispatch):
    """A policy that never prefetches on a budget of one layer (or one slot per layer): an
    optimistic layer runs on what the pool holds and its misses are recomputed after their
    loads, a waiting layer computes its experts once after them; either way the logits and
    tokens are all-resident's bit for bit. Optimistic: one recompute per visit that missed
    (on-demand keeps nothing, so that is every visit); wait: every visit waits, none is
    recomputed; adaptive: a layer waits after a miss at its previous visit of that length."""
    ids, mask = prompts(11, 2, 5)
    want_tokens, want_logits, _ = run_reference(reference, ids, mask)
    eng = engine(policy, slots, dispatch=dispatch)
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    missed = sum(missed_visits(eng))
    assert missed > 0
    if policy == "on-demand":
        assert missed == len(eng.stream)
    recomputed, waited = dispatch_counts(eng, dispatch, ids.shape[1])
    assert (eng.stats.recomputed_layers, eng.stats.waited_layers) == (recomputed, waited)
    if dispatch == "optimistic":
        assert recomputed == missed and waited == 0
    elif dispatch == "wait":
        assert recomputed == 0 and waited == len(eng.stream)
    else:
        assert 0 < recomputed < missed and waited > 0
    assert eng.stats.fused == 0 and eng.stats.recomputed_pieces >= recomputed
    rep = eng.report()
    assert (rep["recomputed_layers"], rep["waited_layers"]) == (recomputed, waited)
    assert sum(r["recomputed"] for r in rep["per_layer"].values()) == recomputed


@settings(max_examples=8, deadline=None)
@given(dispatch=st.sampled_from(DISPATCH),
       policy=st.sampled_from(["on-demand", "lru", "pregated", "predictive-oracle"]),
       seed=st.integers(0, 1000), batch=st.integers(1, 3), slots=st.integers(2, TOTAL))
def test_every_dispatch_is_bitwise_exact(reference, dispatch, policy, seed, batch, slots):
    """Every way of dispatching a layer, under a policy and budget drawn at random, gives the
    all-resident tokens and logits bit for bit and the same visits to the cache core."""
    ids, mask = prompts(seed, batch, 4)
    want_tokens, want_logits, trace = run_reference(reference, ids, mask)
    forecaster = None
    if policy.startswith("predictive"):
        policy, forecaster = "predictive", OracleForecast(trace)
    eng = engine(policy, slots, forecaster, dispatch=dispatch)
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    if not eng.stats.fused:
        recomputed, waited = dispatch_counts(eng, dispatch, ids.shape[1])
        assert (eng.stats.recomputed_layers, eng.stats.waited_layers) == (recomputed, waited)


def test_fused_forward_equals_layer_by_layer(reference):
    """With every expert resident (a warm pool) a decode step is one jitted call; the same run
    layer by layer gives the same bits, and so does a pool that fills on demand, whose fused
    steps recompute from the first layer that needed an expert not yet loaded."""
    ids, mask = prompts(12, 3, 4)
    want_tokens, want_logits, want_trace = run_reference(reference, ids, mask)
    runs = {}
    for name, kw in (("fused", {"warm": True}), ("layers", {"warm": True, "fuse": False})):
        eng = engine("all-resident", TOTAL, **kw)
        runs[name] = eng, eng.greedy(ids, mask, NEW_TOKENS)
    fused, layers = runs["fused"][0], runs["layers"][0]
    assert fused.stats.fused >= NEW_TOKENS - 1 and layers.stats.fused == 0
    assert fused.core.stats.misses == 0 and fused.pool.loads == 0        # preloaded, uncounted
    for eng, (tokens, logits) in runs.values():
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(logits, want_logits)
        np.testing.assert_array_equal(eng.trace().experts, want_trace.experts)
        np.testing.assert_array_equal(eng.trace().pregate, want_trace.pregate)
    # the fused decode steps enter their visits while the next step computes (deferred): once
    # generate returns, the stream, the cache core and the whole trace are the per-layer run's
    assert same_visits(fused.stream, layers.stream)
    assert fused.core.stats.as_dict() == layers.core.stats.as_dict()
    for field in ("request", "position", "phase", "forward", "experts", "probs", "token"):
        np.testing.assert_array_equal(getattr(fused.trace(), field),
                                      getattr(layers.trace(), field))
    # a cold pool that holds everything: one-token prompts leave experts unloaded, so fused
    # decode steps meet misses and recompute from their layer
    ids, mask = prompts(5, 2, 1)
    want_tokens, want_logits, _ = run_reference(reference, ids, mask)
    cold = engine("lru", TOTAL)
    tokens, logits = cold.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    assert cold.stats.fused > 0 and cold.stats.recomputed_layers > 0


def test_profile_breaks_the_time_down_per_layer():
    ids, mask = prompts(3, 2, 4)
    eng = engine("pregated", 6, profile=True)
    eng.greedy(ids, mask, 3)
    assert set(eng.stats.layer_s) == set(LAYERS)
    for row in eng.stats.layer_s.values():
        assert {"layer piece", "routing wait", "plan"} <= set(row)
        assert all(v >= 0 for v in row.values())
    assert {"prepare", "head", "record"} <= set(eng.stats.time_s)


# -- the device slot table -------------------------------------------------------------------

@pytest.fixture(scope="module")
def store():
    return ExpertStore.from_params(CFG, PARAMS)


@jax.jit
def _read(arrays, table):
    """Each (layer row, expert)'s w_down through the table (NaN where the table has none)."""
    picked = arrays["w_down"][jnp.maximum(table, 0)]                 # (L, E, F, D)
    return jnp.where((table >= 0)[..., None, None], picked, jnp.nan)


def expected(store, table) -> np.ndarray:
    out = np.full((*table.shape, *store.shapes["w_down"][0]), np.nan, np.float32)
    for r, layer in enumerate(store.layers):
        for e in range(store.num_experts):
            if table[r, e] >= 0:
                out[r, e] = np.asarray(store.host[layer, e]["w_down"])
    return out


def test_table_follows_hand_built_copy_and_compute_orders(store):
    """Compute dispatched while copies are in flight, then slots rewritten under it: each
    compute reads the weights its (arrays, table) pair names, never a slot's new occupant."""
    pool = SlotPool(store, 2 * EXPERT_BYTES)
    a, b, c = (LAYERS[0], 0), (LAYERS[0], 1), (LAYERS[1], 0)
    pool.load(a)                                      # slot 0, copy in flight
    pool.load(b)                                      # slot 1
    first = _read(pool.arrays, pool.device_table())   # queued behind both copies
    table_first = np.asarray(pool.device_table())
    assert table_first[0, 0] == 0 and table_first[0, 1] == 1
    pool.free(a)                                      # no copy: a's weights stay in slot 0
    freed = _read(pool.arrays, pool.device_table())
    assert pool.slot_table(LAYERS[0])[0] == -1        # not resident ...
    assert np.asarray(pool.device_table())[0, 0] == 0  # ... but still readable, and right
    pool.load(c)                                      # overwrites slot 0 while `freed` may run
    after = _read(pool.arrays, pool.device_table())
    table_after = np.asarray(pool.device_table())
    assert table_after[0, 0] == -1 and table_after[1, 0] == 0 and table_after[0, 1] == 1
    np.testing.assert_array_equal(np.asarray(first), expected(store, table_first))
    np.testing.assert_array_equal(np.asarray(freed), expected(store, table_first))
    np.testing.assert_array_equal(np.asarray(after), expected(store, table_after))
    # an upgrade-style reload into a key's own slot and a batch that reuses a freed slot
    pool.free(b)
    pool.load_many([(b, None, False), (c, 0, False)])
    np.testing.assert_array_equal(np.asarray(_read(pool.arrays, pool.device_table())),
                                  expected(store, np.asarray(pool.device_table())))


@settings(max_examples=12, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["load", "free", "batch", "read"]),
                              st.integers(0, len(LAYERS) * EXPERTS - 1),
                              st.integers(0, len(LAYERS) * EXPERTS - 1)),
                    min_size=4, max_size=24))
def test_table_never_names_a_rewritten_slot(store, ops):
    """Random orders of loads, batched loads, frees and reads (each read dispatched while the
    copies before it may still be in flight, and checked only at the end): every read sees,
    through every table entry, exactly that expert's weights; the device table holds every
    resident expert at its slot."""
    pool = SlotPool(store, 3 * EXPERT_BYTES)
    keys = [(layer, e) for layer in LAYERS for e in range(EXPERTS)]
    reads = []
    for op, i, j in ops:
        key, other = keys[i], keys[j]
        if op == "free" and pool.is_resident(key):
            pool.free(key)
        elif op in ("load", "batch"):
            want = [key] + ([other] if op == "batch" and other != key else [])
            for k in want:
                if pool.is_resident(k):
                    pool.free(k)
            while pool.num_slots - len(pool.resident()) < len(want):
                pool.free(sorted(pool.resident())[0])
            pool.load_many([(k, None, False) for k in want])
        reads.append((_read(pool.arrays, pool.device_table()), pool.device_table()))
        table = np.asarray(pool.device_table())
        for k in pool.resident():
            assert table[LAYERS.index(k[0]), k[1]] == pool.slot_of(k)
    for got, table in reads:
        np.testing.assert_array_equal(np.asarray(got), expected(store, np.asarray(table)))
