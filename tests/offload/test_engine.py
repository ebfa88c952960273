"""Live offload engine: logits and generated tokens bitwise identical to all-resident for every
policy, budget (down to streaming in rounds), batch size and prompt; bitwise equal to the model's
own forward where both take the same expert route (with images too); its visit stream and its
trace replay to the same counts."""

import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.config import get_config
from moex.model import build, forward, init_params
from moex.offload.cache import CacheCore
from moex.offload.forecast import OracleForecast, PriorForecast
from moex.offload.engine import OffloadEngine
from moex.offload.policies import make_policy
from moex.offload.simulator import simulate
from moex.offload.store import ExpertStore
from moex.tokenizer import left_pad

BASE = get_config("tiny-hard")
CFG = BASE.replace(vision=None, projector=None, decoder=dataclasses.replace(
    BASE.decoder, moe=dataclasses.replace(BASE.decoder.moe, num_experts=8, top_k=2)))
PARAMS = init_params(CFG, seed=0)
TOTAL = 2 * 8                                        # MoE layers x experts
EXPERT_BYTES = ExpertStore.from_params(CFG, PARAMS).expert_bytes
NEW_TOKENS = 4


def engine(policy, slots, forecaster=None, **kw):
    return OffloadEngine(CFG, PARAMS, policy, slots * EXPERT_BYTES, forecaster=forecaster, **kw)


def prompts(seed, batch, length):
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(0, 256, rng.integers(1, length + 1)).tolist()
                     for _ in range(batch)], 256)


@pytest.fixture(scope="module")
def reference():
    return {}


def run_reference(cache, ids, mask):
    key = (ids.tobytes(), mask.tobytes(), ids.shape)
    if key not in cache:
        ref = engine("all-resident", TOTAL)
        tokens, logits = ref.greedy(ids, mask, NEW_TOKENS)
        cache[key] = tokens, logits, ref.trace()
    return cache[key]


def model_logits(cfg, params, ids, mask, images=None):
    """The model's own forward, jitted as generation runs it."""
    model = build(cfg)
    run = jax.jit(lambda p, t, m, im: forward(model, p, t, m, im)[0])
    return np.asarray(run(params, ids, mask, images))


VARIANTS = {"plain": {}, "head_bias": {"lm_head_bias": True},
            "shared_sigmoid": {"moe": dataclasses.replace(
                CFG.decoder.moe, num_shared_experts=2, shared_dim=32, shared_gate="sigmoid",
                renormalize=False)}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_matches_model_forward(variant):
    """The engine runs the model's own modules: where both compute the experts by the same
    route its logits are the model's bit for bit, in one round or several. A prompt of 2 x 20
    tokens sorts its pairs in both; a few tokens take another route in each (the model gathers
    or broadcasts over its stacked experts, the pool gathers or sorts), so there they agree to
    rounding."""
    cfg = CFG.replace(decoder=dataclasses.replace(CFG.decoder, **VARIANTS[variant]))
    params = init_params(cfg, seed=0)
    if cfg.decoder.lm_head_bias:    # a bias that matters: random, not its initial zeros
        bias = params["decoder"]["lm_head"]["bias"]
        params["decoder"]["lm_head"]["bias"] = jax.random.normal(jax.random.key(1), bias.shape)
    rng = np.random.default_rng(0)
    long = left_pad([rng.integers(0, 256, n).tolist() for n in (20, 13)], 256)
    for (ids, mask), exact in ((long, True), (prompts(0, 2, 5), False)):
        want = model_logits(cfg, params, ids, mask)
        valid = mask.astype(bool)
        for policy, slots in (("all-resident", TOTAL), ("lru", 3)):
            logits, _ = OffloadEngine(cfg, params, policy, slots * EXPERT_BYTES).forward(ids, mask)
            got = np.asarray(logits)[valid]
            if exact:
                np.testing.assert_array_equal(got, want[valid], err_msg=policy)
            else:
                np.testing.assert_allclose(got, want[valid], atol=1e-5, err_msg=policy)


@settings(max_examples=14, deadline=None)
@given(policy=st.sampled_from(["on-demand", "lru", "lfu", "pregated", "predictive-oracle",
                               "predictive-prior"]),
       seed=st.integers(0, 1000), batch=st.integers(1, 3), slots=st.integers(2, TOTAL))
def test_every_policy_and_budget_is_bitwise_exact(reference, policy, seed, batch, slots):
    ids, mask = prompts(seed, batch, 4)
    want_tokens, want_logits, trace = run_reference(reference, ids, mask)
    forecaster = None
    if policy.startswith("predictive"):
        policy, kind = policy.split("-")
        forecaster = OracleForecast(trace) if kind == "oracle" else PriorForecast.from_trace(trace)
    eng = engine(policy, slots, forecaster)
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    assert eng.pool.pool_bytes <= slots * EXPERT_BYTES        # (SlotPool checks every load)
    stats = eng.core.stats
    counts = (stats.hits, stats.misses, stats.prefetches, stats.prefetch_used)
    # the visit stream replays to the same counts ...
    replay = CacheCore(make_policy(policy), eng.pool.num_slots, eng.store.layers, 8)
    r = replay.run(eng.stream)
    assert (r.hits, r.misses, r.prefetches, r.prefetch_used) == counts
    # ... and so does the simulator on the engine's recorded trace
    sim = simulate(eng.trace(), policy, eng.pool.num_slots, None, EXPERT_BYTES,
                   forecaster=forecaster)
    assert (sim.hits, sim.misses, sim.stats.prefetches, sim.stats.prefetch_used) == counts
    assert eng.pool.loads == stats.loads and eng.pool.bytes_loaded == stats.loads * EXPERT_BYTES
    if policy == "on-demand":
        assert stats.hits == 0


def test_trace_records_every_forward(reference, tmp_path):
    from moex.offload.trace import Trace
    ids, mask = prompts(3, 2, 4)
    _, _, trace = run_reference(reference, ids, mask)
    loaded = Trace.load(trace.save(tmp_path / "engine.npz"))
    for name in ("request", "position", "phase", "forward", "experts", "probs", "pregate"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    assert len(trace) == int(mask.sum()) + 2 * (NEW_TOKENS - 1)
    assert trace.forward.max() == NEW_TOKENS - 1 and (trace.phase[trace.forward > 0] == 1).all()
    assert trace.pregate is not None and (trace.pregate[:, 0] == -1).all()
    assert (trace.pregate[:, 1] >= 0).all()
    trace.check_model(CFG)


def test_rounds_off_states_the_minimum_and_bad_setups_are_named():
    ids, mask = prompts(1, 2, 3)
    with pytest.raises(ValueError, match="minimum budget for this batch is"):
        engine("lru", 2, rounds=False).forward(ids, mask)
    with pytest.raises(ValueError, match="belady needs the future trace"):
        engine("belady", 4)
    with pytest.raises(ValueError, match="predictive needs a forecaster"):
        engine("predictive", 4)
    with pytest.raises(ValueError, match=r"below the minimum of 2 for policy lru"):
        CacheCore(make_policy("lru"), 1, [0, 1], 8).run([(0, frozenset({1}))])
    with pytest.raises(ValueError, match="holds no expert"):
        OffloadEngine(CFG, PARAMS, "lru", EXPERT_BYTES - 1)


def test_forecaster_for_another_model_is_refused(reference):
    ids, mask = prompts(2, 1, 3)
    _, _, trace = run_reference(reference, ids, mask)
    other = CFG.replace(decoder=dataclasses.replace(
        CFG.decoder, moe=dataclasses.replace(CFG.decoder.moe, num_experts=4)))
    params = None                                      # refused before params are read
    with pytest.raises(ValueError, match=r"the oracle's trace does not match .*4 experts"):
        OffloadEngine(other, params, "predictive", 10**9, forecaster=OracleForecast(trace))
    with pytest.raises(ValueError, match=r"prior of shape \(2, 8\) does not match"):
        OffloadEngine(other, params, "predictive", 10**9,
                      forecaster=PriorForecast.from_trace(trace))


def test_images_through_the_engine():
    cfg = BASE
    params = init_params(cfg, seed=1)
    n = cfg.vision.num_image_tokens
    ids, mask = left_pad([[cfg.image_token_id] * n + [5, 6, 7], [8, 9]], cfg.pad_token_id)
    ids[1, :n] = cfg.pad_token_id                          # row 1: text only (image unused)
    v = cfg.vision
    images = jax.random.normal(jax.random.key(0), (2, v.image_size, v.image_size, v.channels))
    want = model_logits(cfg, params, ids, mask, images)
    expert_bytes = ExpertStore.from_params(cfg, params).expert_bytes
    eng = OffloadEngine(cfg, params, "lru", 4 * expert_bytes)
    logits, _ = eng.forward(ids, mask, images=images)
    valid = mask.astype(bool)                 # 2 x 19 tokens: both sort their pairs
    np.testing.assert_array_equal(np.asarray(logits)[valid], want[valid])
    ref = OffloadEngine(cfg, params, "all-resident", 8 * expert_bytes)
    out = ref.generate(ids, mask, images, max_new_tokens=3, stop_tokens=(), return_logits=True)
    got = eng.generate(ids, mask, images, max_new_tokens=3, stop_tokens=(), return_logits=True)
    np.testing.assert_array_equal(got.tokens, out.tokens)
    np.testing.assert_array_equal(got.logits, out.logits)


def test_pinned_host_store_and_report():
    eng = engine("pregated", 6)
    assert eng.store.memory_kind == "pinned_host"
    assert {a.sharding.memory_kind for w in eng.store.host.values() for a in w.values()} == \
        {"pinned_host"}
    assert {a.sharding.memory_kind for a in eng.pool.arrays.values()} == {"device"}
    ids, mask = prompts(5, 2, 4)
    eng.greedy(ids, mask, 3)
    eng.calibrate_copy(repeats=2)
    rep = eng.report()
    assert rep["memory_kind"] == "pinned_host" and rep["slots"] == 6
    assert rep["pool_bytes"] == 6 * EXPERT_BYTES <= rep["budget_bytes"]
    assert rep["bytes_moved"] == (rep["misses"] + rep["prefetches"]) * EXPERT_BYTES
    assert rep["stall_s"] >= 0 and rep["copy_s_estimate"] > 0
    per_layer = rep["per_layer"]
    assert sorted(per_layer) == eng.store.layers
    assert sum(r["bytes_moved"] for r in per_layer.values()) == rep["bytes_moved"]
    assert sum(r["hits"] for r in per_layer.values()) == rep["hits"]
    assert sum(r["stall_s"] for r in per_layer.values()) == pytest.approx(rep["stall_s"])
