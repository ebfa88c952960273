"""Moving fewer bytes: int8 / int4 experts (round-trip error bound, packed sizes), the engine on a
quantized store bitwise equal to the model with the same quantized weights, low-precision misses
and host-computed experts chosen exactly when the cost model says so, and counts that add up."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.config import get_config
from moex.model import init_params
from moex.offload import quant
from moex.offload.cache import CacheCore, Visit
from moex.offload.engine import OffloadEngine
from moex.offload.misses import MissCosts, MissRule, MissSpec, parse_misses
from moex.offload.policies import make_policy
from moex.offload.simulator import TransferModel, simulate_stream
from moex.offload.store import ExpertStore, moe_layers
from moex.tokenizer import left_pad

BASE = get_config("tiny-hard")
CFG = BASE.replace(vision=None, projector=None, decoder=dataclasses.replace(
    BASE.decoder, moe=dataclasses.replace(BASE.decoder.moe, num_experts=8, top_k=2)))
PARAMS = init_params(CFG, seed=0)
TOTAL = 2 * 8
NEW_TOKENS = 3


def prompts(seed, batch, length):
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(0, 256, rng.integers(1, length + 1)).tolist()
                     for _ in range(batch)], 256)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4:16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_within_the_documented_bound(fmt, dtype):
    f = quant.parse_expert_dtype(fmt)
    rng = np.random.default_rng(1)
    w = {"w_gate": rng.normal(size=(64, 96)), "w_up": rng.standard_t(3, size=(64, 96)),
         "w_down": rng.normal(size=(96, 32)) * np.linspace(0.01, 3, 32)}
    w = {n: np.asarray(jnp.asarray(a, dtype)) for n, a in w.items()}
    stored = quant.quantize_expert(w, f)
    back = quant.dequantize_expert_jit(stored, f, dtype)
    qmax = {"int8": 127.5, "int4": 7.5}[f.kind]
    for n, a in w.items():
        a = a.astype(np.float32)
        group = f.group_for(a.shape[0]) if f.kind == "int4" else a.shape[0]
        absmax = np.abs(a.reshape(-1, group, a.shape[1])).max(axis=1)     # (groups, O)
        bound = np.repeat(absmax / qmax / 2, group, axis=0)
        eps = 2 * float(jnp.finfo(jnp.dtype(dtype)).eps)
        err = np.abs(np.asarray(back[n], np.float32) - a)
        assert (err <= bound * (1 + eps) + eps * np.abs(a)).all(), (n, err.max())
        assert back[n].dtype == jnp.dtype(dtype) and back[n].shape == a.shape
    # bytes: int4 packs two values per byte, so it moves >= 3.5x fewer than bf16
    size, item = quant.stored_bytes(stored), jnp.dtype(dtype).itemsize
    full = sum(a.size for a in w.values()) * item
    want = 0
    for a in w.values():
        (i, o), g = a.shape, f.group_for(a.shape[0]) if f.kind == "int4" else a.shape[0]
        want += (i * o // 2 if f.kind == "int4" else i * o) + (i // g) * o * item
    assert size == want == quant.stored_size({n: a.shape for n, a in w.items()}, f, item)
    if f.kind == "int4" and f.group is None and dtype == "bfloat16":
        assert full / size >= 3.5


def test_int4_packing_is_exact_and_bad_input_is_named():
    q = np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(3, axis=1)
    packed = quant.pack_int4(q)
    assert packed.shape == (8, 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(jnp.asarray(packed))), q)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        quant.pack_int4(q * 2)
    with pytest.raises(ValueError, match="does not split into even groups of 64"):
        quant.quantize_matrix(np.ones((96, 4), np.float32), quant.parse_expert_dtype("int4:64"))
    assert quant.parse_expert_dtype("int4").group_for(96) == 48
    with pytest.raises(ValueError, match="expected native, int8, int4 or int4:G"):
        quant.parse_expert_dtype("int3")
    with pytest.raises(ValueError, match="upgrade needs a low-precision copy"):
        parse_misses("upgrade")
    with pytest.raises(ValueError, match=r"use host\+fill"):
        parse_misses("fill")
    assert parse_misses("low+upgrade+host") == MissSpec(quant.QuantFormat("int4"), True, True)
    assert quant.parse_expert_dtype("native") is None
    assert parse_misses("load").plain and str(parse_misses("low:int8")) == "low:int8"


@pytest.fixture(scope="module")
def stores():
    return {f: ExpertStore.from_params(CFG, PARAMS, expert_dtype=f) for f in ("int8", "int4")}


@pytest.fixture(scope="module")
def references():
    return {}


def reference(cache, fmt, ids, mask):
    """The all-resident model with the same quantized weights (experts replaced by their round
    trip), run by an all-resident engine on a native store of those weights."""
    key = (fmt, ids.tobytes(), mask.tobytes(), ids.shape)
    if key not in cache:
        params = quant.quantized_params(PARAMS, moe_layers(CFG), 8,
                                        quant.parse_expert_dtype(fmt))
        store = ExpertStore.from_params(CFG, params)
        ref = OffloadEngine(CFG, None, "all-resident", store.total_bytes, store=store)
        cache[key] = ref.greedy(ids, mask, NEW_TOKENS)
    return cache[key]


def test_quantized_slots_need_a_quantized_store(stores):
    with pytest.raises(ValueError, match="quantized slots hold the store's int8 / int4"):
        OffloadEngine(CFG, PARAMS, "lru", 10**6, quantized_slots=True)
    eng = OffloadEngine(CFG, None, "lru", 3 * stores["int4"].stored_bytes, store=stores["int4"],
                        quantized_slots=True)
    assert eng.pool.num_slots == 3 and eng.pool.arrays["w_up"].dtype == np.uint8


@settings(max_examples=5, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), policy=st.sampled_from(["lru", "pregated",
                                                                      "on-demand"]),
       seed=st.integers(0, 1000), batch=st.integers(1, 3), slots=st.integers(1, TOTAL),
       quantized=st.booleans())
def test_quantized_store_is_bitwise_the_quantized_model(stores, references, fmt, policy, seed,
                                                        batch, slots, quantized):
    store = stores[fmt]
    slots = max(slots, 1 if quantized else 2)
    ids, mask = prompts(seed, batch, 4)
    want_tokens, want_logits = reference(references, fmt, ids, mask)
    budget = slots * store.expert_bytes
    eng = OffloadEngine(CFG, None, policy, budget, store=store, quantized_slots=quantized)
    tokens, logits = eng.greedy(ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    # dequantized slots: as many as native; quantized slots: budget / stored size. Every load
    # moves the stored size, and the pool stays within its budget.
    assert eng.pool.num_slots == (budget // store.stored_bytes if quantized else slots)
    assert eng.pool.bytes_loaded == eng.pool.loads * store.stored_bytes
    assert eng.pool.pool_bytes <= budget
    assert store.stored_bytes * (3.5 if fmt == "int4" else 1.9) <= store.expert_bytes


def costs(**kw):
    base = dict(link_bytes_per_s=1e9, link_latency_s=0.0, host_seconds_per_row=1e-3,
                host_overhead_s=0.0, stored_bytes=4_000_000, low_bytes=1_000_000)
    return MissCosts(**{**base, **kw})


@pytest.mark.parametrize("spec, kw, rows, want", [
    ("load", {}, 1, "load"),
    ("low", {}, 1, "low"),                                  # 1 ms beats 4 ms
    ("low", {"hide_s": 0.005}, 1, "load"),                  # the full copy hides: no stall
    ("low", {"low_bytes": 4_000_000}, 1, "load"),           # tie: the precise one
    ("host", {}, 3, "host"),                                # 3 ms beats 4 ms
    ("host", {}, 5, "load"),                                # 5 ms loses to 4 ms
    ("low+host", {}, 1, "host"),                            # 1 ms host ties 1 ms low: host
    ("low+host", {}, 2, "low"),
    ("low+host", {"host_overhead_s": 0.01}, 1, "low"),
])
def test_the_cost_model_decides(spec, kw, rows, want):
    assert MissRule(parse_misses(spec), costs(**kw)).decide(rows) == want


def test_core_serves_misses_as_decided_and_counts_add_up():
    """Hand-built visit of layer 0: expert 2 picked by 9 rows goes first (low copy, 1 ms, beats
    the 4 ms load and 4.5 ms on the host); then expert 1 (1 row): the host's 0.5 ms beats the
    link, now busy until 1 ms."""
    rule = MissRule(parse_misses("low+upgrade+host"), costs(host_seconds_per_row=0.5e-3))
    core = CacheCore(make_policy("lru"), 4, [0, 1], 8, misses=rule)
    plan = core.visit(0, Visit(0, frozenset({1, 2}), rows=((1, 1), (2, 9))))
    assert plan.host == frozenset({1})                      # 0.5 ms on the host
    assert [(l.key, l.kind) for l in plan.rounds[0].loads] == [((0, 2), "low")]
    assert [(l.key, l.kind) for l in plan.prefetch] == [((0, 2), "upgrade")]
    plan = core.visit(1, Visit(0, frozenset({2}), rows=((2, 1),)))
    assert plan.rounds[0].loads == [] and plan.host == frozenset()          # a hit
    s = core.stats
    assert (s.hits, s.misses, s.served_host, s.served_low, s.upgrades) == (1, 2, 1, 1, 1)
    assert s.hits + s.misses == 3 and s.served_low + s.served_host <= s.misses
    # the simulator times the same decisions: the low copy is 1 ms, the host's row 0.5 ms
    sim = simulate_stream([Visit(0, frozenset({1, 2}), rows=((1, 1), (2, 9)))], "lru", 4,
                          [0, 1], 8, 4_000_000, TransferModel(1e9, 0.0), misses=rule)
    assert sim.bytes_moved == 1_000_000 + 4_000_000          # low copy + its upgrade
    assert sim.host_s == pytest.approx(0.5e-3) and sim.stall_s == pytest.approx(1e-3)


@settings(max_examples=4, deadline=None)
@given(spec=st.sampled_from(["low", "low+upgrade", "host", "host+fill", "low+upgrade+host"]),
       seed=st.integers(0, 1000), slots=st.integers(2, 10))
def test_engine_counts_add_up_and_replay(spec, seed, slots):
    store = _mixed_store()
    rule = MissRule(parse_misses(spec), costs(stored_bytes=store.stored_bytes,
                                              low_bytes=store.low_bytes,
                                              host_seconds_per_row=1e-9 if "host" in spec
                                              and seed % 2 else 1.0))
    eng = OffloadEngine(CFG, None, "lru", slots * store.expert_bytes, store=store, misses=rule)
    ids, mask = prompts(seed, 2, 4)
    eng.greedy(ids, mask, NEW_TOKENS)
    s = eng.core.stats
    assert s.accesses == s.hits + s.misses and s.served_low + s.served_host <= s.misses
    assert eng.pool.low_loads == s.served_low
    assert eng.pool.loads == s.misses - s.served_host + s.prefetches + s.upgrades
    replay = CacheCore(make_policy("lru"), eng.pool.num_slots, eng.store.layers, 8,
                       misses=rule).run(eng.stream)
    eng.core.finish()                       # a replay counts prefetches unused at the end
    assert replay.as_dict() == s.as_dict()


_STORE = {}


def _mixed_store():
    if not _STORE:
        _STORE["s"] = ExpertStore.from_params(CFG, PARAMS, low_dtype="int4")
    return _STORE["s"]


HOST_SCRIPT = r"""
import dataclasses, sys
import jax, numpy as np
assert len(jax.devices()) == 2, jax.devices()
from moex.config import get_config
from moex.model import init_params
from moex.offload.engine import OffloadEngine
from moex.offload.misses import MissCosts, MissRule, parse_misses
from moex.offload.store import ExpertStore
from moex.tokenizer import left_pad
base = get_config("tiny-hard")
cfg = base.replace(vision=None, projector=None, decoder=dataclasses.replace(
    base.decoder, moe=dataclasses.replace(base.decoder.moe, num_experts=8, top_k=2)))
store = ExpertStore.from_params(cfg, init_params(cfg, seed=0))
ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 256)
ref = OffloadEngine(cfg, None, "all-resident", store.total_bytes, store=store)
want_tokens, want_logits = ref.greedy(ids, mask, 4)
rule = MissRule(parse_misses("host"), MissCosts(1e9, 0.0, 1e-9, 0.0, store.stored_bytes))
eng = OffloadEngine(cfg, None, "lru", 4 * store.expert_bytes, store=store, misses=rule)
assert eng.host_device == jax.devices()[1] and eng.pool.device == jax.devices()[0]
tokens, logits = eng.greedy(ids, mask, 4)
s = eng.core.stats
assert s.served_host == s.misses > 0 and eng.pool.loads == 0, s.as_dict()
np.testing.assert_array_equal(tokens, want_tokens)
np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
print("diff", float(np.abs(logits - want_logits).max()), "served_host", s.served_host)
"""


def test_host_computed_experts_on_a_second_cpu_device(tmp_path):
    """Two CPU devices (a subprocess, so the rest of the suite keeps one): every miss runs on
    device 1, the pool on device 0; logits match the all-resident engine within float
    tolerance."""
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "served_host" in out.stdout
