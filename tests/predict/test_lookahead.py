"""Lookahead heads and the policies that use them: trace format v3 (hidden states) round trip
with v1 / v2 files still loading, heads that overfit a small trace to recall 1.0, exact resume,
the lookahead and combined policies bitwise exact against all-resident (hypothesis-drawn budgets
and batches) with the live engine, its visit stream and the simulator counting alike, a head set
for another model shape refused, and `moex predictor train --kind lookahead` / `eval --heads`."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.cli import main
from moex.config import get_config
from moex.model import init_params
from moex.offload.cache import CacheCore
from moex.offload.engine import OffloadEngine
from moex.offload.forecast import OracleForecast, PriorForecast
from moex.offload.policies import make_policy
from moex.offload.simulator import simulate
from moex.offload.spec import parse_policy
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace
from moex.predict.lookahead import (HeadTrainConfig, LookaheadConfig, LookaheadHints,
                                    head_probabilities, load_heads, save_heads, targets,
                                    train_heads)
from moex.predict.metrics import topk_sets
from moex.tokenizer import left_pad

BASE = get_config("tiny-hard")
CFG = BASE.replace(vision=None, projector=None, decoder=dataclasses.replace(
    BASE.decoder, num_layers=4, moe=dataclasses.replace(BASE.decoder.moe, num_experts=8,
                                                        top_k=2)))
PARAMS = init_params(CFG, seed=0)
STORE = ExpertStore.from_params(CFG, PARAMS)
TOTAL = 4 * 8
NEW_TOKENS = 4
OVERFIT = HeadTrainConfig(steps=300, batch_size=32, lr=1e-2, warmup=10)


def prompts(seed, batch, length):
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(0, 256, rng.integers(1, length + 1)).tolist()
                     for _ in range(batch)], 256)


def reference(ids, mask, **kw):
    eng = OffloadEngine(CFG, None, "all-resident", STORE.total_bytes, store=STORE, **kw)
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    return tokens, logits, eng.trace()


@pytest.fixture(scope="module")
def recorded():
    ids, mask = prompts(0, 3, 6)
    return reference(ids, mask, record_hidden=True)[2]


@pytest.fixture(scope="module")
def hints(recorded):
    cfg = LookaheadConfig.for_trace(recorded, offsets=(1, 2, 3), hidden=64)
    params, _ = train_heads(recorded, cfg, OVERFIT, progress=False)
    return LookaheadHints(cfg, params)


def test_trace_v3_round_trip_and_older_formats_load(recorded, tmp_path):
    t = Trace.load(recorded.save(tmp_path / "v3.npz"))
    assert t.hidden.shape == (len(t), 4, CFG.decoder.d_model) == t.hidden_pre.shape
    assert t.hidden.dtype == np.float16
    for name in ("experts", "pregate", "token", "hidden", "hidden_pre", "forward"):
        np.testing.assert_array_equal(getattr(t, name), getattr(recorded, name))
    # the post-attention state differs from the layer input (attention added to it)
    assert not np.array_equal(t.hidden, t.hidden_pre)
    # v2 (no hidden states) and v1 (no forward, no pre-gate) files still load
    for version, drop in (("v2", ("hidden", "hidden_pre")),
                          ("v1", ("hidden", "hidden_pre", "forward", "pregate", "token"))):
        with np.load(tmp_path / "v3.npz") as z:
            data = {k: z[k] for k in z.files if k not in drop}
        meta = json.loads(str(data["meta"]))
        data["meta"] = np.asarray(json.dumps({**meta, "format": f"moex-trace-{version}"}))
        np.savez(tmp_path / f"{version}.npz", **data)
        old = Trace.load(tmp_path / f"{version}.npz")
        assert old.hidden is None and old.hidden_pre is None
        np.testing.assert_array_equal(old.experts, recorded.experts)
        if version == "v1":
            np.testing.assert_array_equal(old.forward, np.arange(len(old)))
    # a hidden array of the wrong shape is named
    with np.load(tmp_path / "v3.npz") as z:
        data = {k: z[k] for k in z.files}
    data["hidden_pre"] = data["hidden_pre"][:, :2]
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ValueError, match="bad.npz: hidden_pre has shape"):
        Trace.load(tmp_path / "bad.npz")


def test_heads_overfit_a_small_trace_to_recall_one(recorded, hints):
    cfg = hints.cfg
    probs = head_probabilities(cfg, hints.params, recorded.hidden)           # (N, L, O, E)
    goal = targets(recorded, cfg)
    for j, o in enumerate(cfg.offsets):
        layers = cfg.num_layers - o
        pred = topk_sets(probs[:, :layers, j], recorded.top_k)
        truth = goal[:, :layers, j]
        assert (pred & truth).sum() == truth.sum(), f"offset {o}"
    # the targets are the trace's own routes, shifted by the offset
    np.testing.assert_array_equal(np.flatnonzero(goal[0, 0, 0]),
                                  np.sort(recorded.experts[0, 1]))
    assert not goal[:, cfg.num_layers - 1].any()                     # nothing past the end


def test_heads_resume_exactly_and_save_load(recorded, tmp_path):
    cfg = LookaheadConfig.for_trace(recorded, offsets=(1, 2), hidden=0)
    train_cfg = HeadTrainConfig(steps=6, batch_size=8, warmup=2)
    straight, _ = train_heads(recorded, cfg, train_cfg, progress=False)
    ckpt = tmp_path / "ckpt"
    train_heads(recorded, cfg, train_cfg, ckpt_dir=ckpt, progress=False, stop_at=3)
    resumed, _ = train_heads(recorded, cfg, train_cfg, ckpt_dir=ckpt, progress=False)
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    save_heads(tmp_path / "heads", cfg, resumed)
    cfg2, loaded = load_heads(tmp_path / "heads")
    assert cfg2 == cfg and cfg.head_params == CFG.decoder.d_model + CFG.decoder.d_model * 16 + 16
    jax.tree.map(np.testing.assert_array_equal, resumed, loaded)


@settings(max_examples=7, deadline=None)
@given(policy=st.sampled_from(["lookahead", "predictive-oracle", "predictive-prior"]),
       seed=st.integers(0, 1000), batch=st.integers(1, 3), slots=st.integers(2, TOTAL))
def test_lookahead_and_combined_policies_are_bitwise_exact(hints, policy, seed, batch, slots):
    ids, mask = prompts(seed, batch, 5)
    want_tokens, want_logits, trace = reference(ids, mask, record_hidden=True)
    forecaster = None
    if policy.startswith("predictive"):
        policy, kind = policy.split("-")
        forecaster = OracleForecast(trace) if kind == "oracle" else PriorForecast.from_trace(trace)
    eng = OffloadEngine(CFG, None, policy, slots * STORE.expert_bytes, store=STORE,
                        forecaster=forecaster, lookahead=hints)
    assert eng.policy.name == ("lookahead" if policy == "lookahead" else "predictive+lookahead")
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    s = eng.core.stats
    counts = (s.hits, s.misses, s.prefetches, s.prefetch_used)
    replay = CacheCore(make_policy(policy, lookahead=True), eng.pool.num_slots, STORE.layers, 8)
    r = replay.run(eng.stream)
    assert (r.hits, r.misses, r.prefetches, r.prefetch_used) == counts
    # the simulator computes the hints from the recorded hidden states: the same decisions
    sim = simulate(trace, policy, eng.pool.num_slots, None, STORE.expert_bytes,
                   forecaster=forecaster, lookahead=hints)
    assert (sim.hits, sim.misses, sim.stats.prefetches, sim.stats.prefetch_used) == counts


def test_good_heads_beat_lru_on_their_trace(recorded, hints):
    """On the trace the heads fit, lookahead prefetching turns misses into hits."""
    slots = 8
    lru = simulate(recorded, "lru", slots, None, STORE.expert_bytes)
    ahead = simulate(recorded, "lookahead", slots, None, STORE.expert_bytes, lookahead=hints)
    assert ahead.hit_rate > lru.hit_rate


def test_heads_for_another_shape_are_refused(recorded, hints, tmp_path):
    other = CFG.replace(decoder=dataclasses.replace(
        CFG.decoder, moe=dataclasses.replace(CFG.decoder.moe, num_experts=4)))
    with pytest.raises(ValueError, match=r"lookahead heads for \(MoE layers, experts, width\) = "
                                         r"\(4, 8, 64\).*it has \(4, 4, 64\)"):
        OffloadEngine(other, init_params(other, 0), "lookahead", 10**9, lookahead=hints)
    narrow = dataclasses.replace(recorded, hidden=recorded.hidden[..., :32])
    with pytest.raises(ValueError, match=r"hidden width\) = \(4, 8, 32\).*need \(4, 8, 64\)"):
        hints.cfg.check_trace(narrow)
    with pytest.raises(ValueError, match="lookahead needs lookahead heads"):
        OffloadEngine(CFG, None, "lookahead", 10**9, store=STORE)
    with pytest.raises(ValueError, match="not a lookahead head-set folder"):
        parse_policy(f"predictive:prior+{tmp_path}")
    with pytest.raises(ValueError, match="no `hidden` hidden states"):
        LookaheadConfig.for_trace(dataclasses.replace(recorded, hidden=None))


def test_cli_trains_evaluates_and_runs_the_combined_policy(recorded, tmp_path):
    trace = recorded.save(tmp_path / "trace.npz")
    heads = tmp_path / "heads"
    assert main(["predictor", "train", str(trace), "--kind", "lookahead", "--out", str(heads),
                 "--steps", "4", "--batch-size", "8", "--hidden", "16", "--offsets", "1",
                 "2"]) == 0
    cfg, _ = load_heads(heads)
    assert cfg.offsets == (1, 2) and cfg.hidden == 16
    spec = parse_policy(f"predictive:prior+{heads}")
    assert (spec.forecast, str(spec.lookahead)) == ("prior", str(heads))
    assert spec.label == "predictive:prior+lookahead" and parse_policy(str(spec)) == spec
    assert main(["predictor", "eval", str(trace), "--prior-trace", str(trace), "--heads",
                 str(heads), "--gen-len", "3", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "predictor_eval.json").read_text())
    methods = report["traces"]["trace.npz"]
    assert {"lookahead_d1", "lookahead_d2", "pregate", "tlp", "slp", "prior"} <= set(methods)
    assert methods["lookahead_d2"]["topk_recall"][:2] == [None, None]    # no head reaches them
    assert report["generated"]["trace.npz"]["tlp"]["positions"] == 3 * 3


def test_rpp_reading_first_layer_states_trains_and_runs_live(recorded, tmp_path):
    """The routing-path predictor may also read the states entering the first MoE layer (a
    VLM's image tokens): trained from a v3 trace, run live at admission, numbers unchanged."""
    from moex.predict.forecast import PredictorForecast
    from moex.predict.train import PredictorShape, PredictorTrainConfig, load_predictor, \
        train_from_trace
    trace = recorded.save(tmp_path / "trace.npz")
    train_from_trace(trace, tmp_path / "rpp", PredictorShape(gen_len=3, d_model=16, d_ff=32,
                                                             states=True),
                     PredictorTrainConfig(steps=3, batch_size=2, warmup=1))
    rpp_cfg, params = load_predictor(tmp_path / "rpp")
    assert rpp_cfg.state_width == CFG.decoder.d_model
    ids, mask = prompts(0, 3, 6)
    want_tokens, want_logits, _ = reference(ids, mask)
    eng = OffloadEngine(CFG, None, "predictive", 6 * STORE.expert_bytes, store=STORE,
                        forecaster=PredictorForecast(rpp_cfg, params))
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    assert eng.core.stats.prefetches > 0
    with pytest.raises(ValueError, match="reads the first MoE layer's input states"):
        PredictorForecast(rpp_cfg, params).for_forward(0, ids, mask, prefill=True)
