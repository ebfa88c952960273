"""Offloading projected with the performance model: the simulator's timeline with model-derived
times (by hand), trace mapping onto larger expert counts, and the projection rows."""

import dataclasses

import numpy as np
import pytest

from moex.config import DecoderConfig, MoEConfig, VLMConfig, get_config
from moex.experiments.projection import ProjectConfig, offload_rows, offload_md
from moex.offload.simulator import simulate
from moex.offload.trace import Trace
from moex.perf.hardware import get_hardware
from moex.perf.model import predict
from moex.perf.offload import (ModelCompute, dense_trace, decode_only, expert_bytes, map_trace,
                               sim_models, trace_for)

LM = VLMConfig("hand-lm", DecoderConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4,
                                        num_kv_heads=2, ffn_dim=128,
                                        moe=MoEConfig(kind="hard", num_experts=4, top_k=1,
                                                      expert_dim=32))).validate()


def hand_trace() -> Trace:
    """2 decode forwards of one token; MoE layer 0 uses expert 0, layer 1 expert 1; the
    pre-gate (row 1: layer 1 predicted from layer 0) is right."""
    experts = np.array([[[0], [1]], [[0], [1]]], np.int16)
    pregate = np.array([[[-1], [1]], [[-1], [1]]], np.int16)
    probs = np.full((2, 2, 4), 0.25, np.float16)
    return Trace(model="hand", moe_layers=[0, 1], num_experts=4, top_k=1,
                 request=np.zeros(2, np.int32), position=np.array([5, 6], np.int32),
                 phase=np.ones(2, np.int8), experts=experts, probs=probs,
                 forward=np.array([0, 1], np.int32), pregate=pregate)


@pytest.mark.parametrize("hardware", ["h200", "rtx4090"])
def test_simulator_with_model_times_reproduces_the_hand_timeline(hardware):
    hw = get_hardware(hardware)
    trace = hand_trace()
    compute, transfer = sim_models(LM, hw, context=64, trace=trace)
    # c: one MoE-layer visit = the model's decode step at B=1 over 2 MoE layers
    c = predict(LM, hw, "decode", 1, 64, compute.routing).seconds / 2
    assert compute.visit_seconds(1) == pytest.approx(c)
    eb = expert_bytes(LM)
    assert eb == 3 * 64 * 32 * 4
    tau = hw.link_latency + eb / hw.link_bandwidth            # one expert copy
    run = lambda policy, slots: simulate(trace, policy, slots, None, eb, transfer, compute)
    # on-demand keeps nothing: each of the 4 visits waits for its copy, then computes
    assert run("on-demand", 1).total_s == pytest.approx(4 * tau + 4 * c)
    # per-layer LRU with a slot per layer: forward 0 misses twice, forward 1 hits twice
    lru = run("lru", 2)
    assert lru.total_s == pytest.approx(2 * tau + 4 * c)
    assert lru.stall_s == pytest.approx(2 * tau)
    # pre-gated: layer 1's expert is copied while layer 0 computes (issued when layer 0's own
    # copy lands, at tau; ready at 2 tau); layer 1 starts at max(2 tau, tau + c)
    pre = run("pregated", 2)
    assert pre.total_s == pytest.approx(tau + max(tau, c) + 3 * c)
    assert pre.compute_s == pytest.approx(4 * c)
    assert pre.copy_s == pytest.approx(2 * tau)


def random_trace(n=60, experts=4, k=2, layers=3, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                   for _ in range(n)]).astype(np.int16)
    pre = ex.copy()
    wrong = rng.random((n, layers)) < 0.3
    pre[wrong] = (pre[wrong] + 1) % experts                    # some guesses wrong
    pre[:, 0] = -1
    probs = rng.random((n, layers, experts)).astype(np.float16)
    forward = np.repeat(np.arange(n // 2), 2).astype(np.int32)
    return Trace(model="src", moe_layers=list(range(layers)), num_experts=experts, top_k=k,
                 request=(np.arange(n) % 2).astype(np.int32),
                 position=np.arange(n, dtype=np.int32) // 2,
                 phase=(np.arange(n) >= 10).astype(np.int8), experts=ex, probs=probs,
                 forward=forward, pregate=pre)


def test_map_trace_keeps_blocks_paths_and_pregate_accuracy():
    src = random_trace()
    out = map_trace(src, num_experts=16, top_k=4, num_moe_layers=5)
    assert out.experts.shape == (60, 5, 4) and out.probs.shape == (60, 5, 16)
    m = 4
    for j in range(5):
        s = j % 3
        mapped = out.experts[:, j]
        # every source choice becomes 2 experts of its own block of 4
        assert (np.sort(mapped // m, 1) == np.sort(np.repeat(src.experts[:, s], 2, 1), 1)).all()
        assert all(len(set(row)) == 4 for row in mapped.tolist())
        # a right source pre-gate guess is a right target guess, a wrong one stays wrong
        if s == 0:
            assert (out.pregate[:, j] == -1).all()
            continue
        right = (np.sort(src.pregate[:, s], 1) == np.sort(src.experts[:, s], 1)).all(1)
        same = (np.sort(out.pregate[:, j], 1) == np.sort(mapped, 1)).all(1)
        assert (right == same).all() and right.any() and (~right).any()
    # tokens that took the same source path take the same target experts
    key = [tuple(sorted(r[0])) + tuple(sorted(r[1])) for r in src.experts.tolist()]
    for a in range(60):
        for b in range(a):
            if key[a] == key[b]:
                assert sorted(out.experts[a, 1]) == sorted(out.experts[b, 1])
    assert np.allclose(out.probs[:, 0].astype(np.float32).sum(1),
                       src.probs[:, 0].astype(np.float32).sum(1), rtol=1e-2)


def test_map_trace_refuses_shapes_it_cannot_keep():
    with pytest.raises(ValueError, match="multiple of 4"):
        map_trace(random_trace(), num_experts=6, top_k=2, num_moe_layers=4)
    with pytest.raises(ValueError, match="top_k"):
        map_trace(random_trace(), num_experts=8, top_k=8, num_moe_layers=4)


def test_trace_for_a_soft_decoder_needs_every_expert_and_decode_only_keeps_decode():
    soft = get_config("llava-1.5-7b-soft")
    t = trace_for(soft, random_trace())
    assert t.top_k == 4 and (np.sort(t.experts, -1) == np.arange(4)).all()
    assert len(t.moe_layers) == 16
    same = trace_for(LM.replace(decoder=dataclasses.replace(
        LM.decoder, moe=dataclasses.replace(LM.decoder.moe, top_k=2))), random_trace(layers=2))
    assert same.model == "src"
    d = decode_only(random_trace())
    assert len(d) == 50 and (d.phase == 1).all()
    assert len(dense_trace(random_trace(), 8, [0, 2], "x").moe_layers) == 2


def test_offload_projection_rows_stay_under_all_resident_and_belady_bounds_lru():
    p = ProjectConfig(offload_presets=("mixtral-8x7b", "llava-1.5-7b-soft"),
                      offload_hardware=("rtx4090",), offload_batches=(2,), budgets=("50%",),
                      policies=("lru", "pregated", "belady"), context=512)
    rows = offload_rows(p, random_trace(n=80), progress=False)
    ok = [r for r in rows if "skipped" not in r]
    assert {r["policy"] for r in ok} == {"all-resident", "lru", "pregated", "belady"}
    for r in ok:
        assert r["ratio_to_resident"] <= 1 + 1e-9
        assert r["tokens_per_s"] <= r["transfer_bound_tokens_per_s"] * (1 + 1e-9)
    mix = {r["policy"]: r for r in ok if r["model"] == "mixtral-8x7b"}
    assert mix["belady"]["hit_rate"] >= mix["lru"]["hit_rate"]
    assert mix["lru"]["ratio_to_resident"] < 0.5       # 352 MB experts over PCIe 4.0
    assert "mixtral-8x7b" in offload_md(rows)
    m = ModelCompute(get_config("mixtral-8x7b"), get_hardware("h200"), 512)
    assert m.visit_seconds(8) > m.visit_seconds(1)


def test_precision_projection_fewer_bytes_and_bounds():
    """Quantized stores move their stored size, the bound holds every variant, and the
    variants' counts add up (random trace, tiny grid)."""
    from moex.experiments.precision_projection import PrecisionConfig, best, rows_for
    from moex.perf.offload import expert_bytes, stored_expert_bytes
    cfg = get_config("mixtral-8x7b")
    assert expert_bytes(cfg) / stored_expert_bytes(cfg, "int4") >= 3.5
    p = PrecisionConfig(hardware=("h200",), batches=(1,), budgets=("25%",),
                        policies=("lru", "pregated"),
                        variants=("native/load", "int4/load", "native/low:int4+upgrade",
                                  "native/host", "int4/low:int4+host"))
    rows = rows_for(p, random_trace(n=40), progress=False)
    at = {(r["policy"], r["variant"]): r for r in rows}
    assert len(rows) == 10 and at["lru", "native/load"]["x_bf16_lru"] == 1.0
    lru, q = at["lru", "native/load"], at["lru", "int4/load"]
    assert q["hit_rate"] == lru["hit_rate"]                      # same decisions, fewer bytes
    assert lru["gb_moved_per_token"] / q["gb_moved_per_token"] >= 3.5
    for r in rows:
        assert r["tokens_per_s"] <= r["bound_tokens_per_s"] * (1 + 1e-9)
        assert r["served_low"] + r["served_host"] <= r["misses"]
        if r["variant"] == "native/load":
            assert r["served_low"] == r["served_host"] == 0
    assert at["lru", "native/host"]["served_host"] > 0
    assert at["lru", "native/low:int4+upgrade"]["upgrades"] > 0
    assert len(best(rows)) == 1
