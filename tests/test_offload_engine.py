"""Live offload engine: logits and greedy tokens bitwise identical across policies and budgets,
close to the model's own forward; its visit stream replays to the same hits and misses."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.config import get_config
from moex.model import build, forward, init_params
from moex.offload.engine import OffloadEngine
from moex.offload.policies import CacheCore, make_policy
from moex.offload.store import ExpertStore
from moex.tokenizer import left_pad

BASE = get_config("tiny-hard")
CFG = BASE.replace(vision=None, projector=None, decoder=dataclasses.replace(
    BASE.decoder, moe=dataclasses.replace(BASE.decoder.moe, num_experts=8, top_k=1)))
PARAMS = init_params(CFG, seed=0)
TOTAL = 2 * 8                                        # MoE layers x experts


EXPERT_BYTES = ExpertStore.from_params(CFG, PARAMS).expert_bytes


def engine(policy, slots):
    return OffloadEngine(CFG, PARAMS, policy, slots * EXPERT_BYTES)


@pytest.fixture(scope="module")
def reference():
    return engine("all-resident", TOTAL)


def prompts(seed, batch, length):
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(0, 256, rng.integers(1, length + 1)).tolist()
                     for _ in range(batch)], 256)


def test_engine_matches_model_forward(reference):
    ids, mask = prompts(0, 2, 5)
    logits, _ = reference.forward(ids, mask)
    want = np.asarray(forward(build(CFG), PARAMS, ids, mask)[0])
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], want[valid], atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(policy=st.sampled_from(["on-demand", "lru", "lfu"]), seed=st.integers(0, 1000),
       batch=st.integers(1, 2), extra=st.integers(0, 4))
def test_every_policy_and_budget_is_bitwise_exact(reference, policy, seed, batch, extra):
    ids, mask = prompts(seed, batch, 3)
    need = batch * 3                                 # most experts one layer visit can need
    slots = min(TOTAL, (2 * need if policy in ("lru", "lfu") else need) + extra)
    eng = engine(policy, slots)
    want_tokens, want_logits = reference.greedy(ids, mask, 4)
    tokens, logits = eng.greedy(ids, mask, 4)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)
    assert eng.pool.pool_bytes <= slots * eng.store.expert_bytes
    replay = CacheCore(make_policy(policy), eng.pool.num_slots, eng.store.layers, 8)
    stats = replay.run(eng.stream)
    assert (stats.hits, stats.misses) == (eng.core.stats.hits, eng.core.stats.misses)
    assert eng.pool.loads == stats.misses


def test_batch_too_big_for_budget_states_minimum():
    ids, mask = prompts(1, 2, 3)
    eng = engine("lru", 2)
    with pytest.raises(ValueError, match="minimum budget for this batch is"):
        eng.forward(ids, mask)
    with pytest.raises(ValueError, match="belady needs the future trace"):
        engine("belady", 4)
