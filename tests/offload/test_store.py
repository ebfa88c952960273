"""Expert store in host memory and the device slot pool: memory kinds, budget, exact compute
through the expert->slot map without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.nn.experts import experts_routed
from moex.nn.routing import route
from moex.offload import ExpertStore, SlotPool, moe_layers
from tests.helpers import tiny


@pytest.fixture(scope="module")
def store():
    cfg, _, params = tiny("tiny-hard")
    return ExpertStore.from_params(cfg, params)


def test_experts_live_in_pinned_host_memory(store):
    cfg = store.cfg
    assert store.memory_kind == "pinned_host"               # the CPU backend offers it
    assert len(store.host) == len(moe_layers(cfg)) * cfg.decoder.moe.num_experts
    kinds = {a.sharding.memory_kind for arrays in store.host.values() for a in arrays.values()}
    assert kinds == {"pinned_host"}
    for i in store.layers:
        assert "experts" not in store.dense_params["decoder"][f"layer_{i}"]["ffn"]
        assert "router" in store.dense_params["decoder"][f"layer_{i}"]["ffn"]


def test_pool_respects_budget_and_refuses_too_small(store):
    budget = int(2.5 * store.expert_bytes)
    pool = SlotPool(store, budget)
    assert pool.num_slots == 2 and pool.pool_bytes <= budget
    assert {a.sharding.memory_kind for a in pool.arrays.values()} == {"device"}
    with pytest.raises(ValueError, match=f"one expert of tiny-hard is {store.expert_bytes} B"):
        SlotPool(store, store.expert_bytes - 1)
    with pytest.raises(KeyError, match="no expert"):
        pool.load((99, 0), 0)


def test_compute_through_slots_is_exact_and_never_recompiles(store):
    cfg, _, params = tiny("tiny-hard")
    layer = store.layers[0]
    experts = params["decoder"][f"layer_{layer}"]["ffn"]["experts"]
    e = cfg.decoder.moe.num_experts
    pool = SlotPool(store, e * store.expert_bytes)
    pool.load((layer, 0), 0)
    compiled = pool._update._cache_size()      # jit caches are shared per function: count growth
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, cfg.decoder.d_model)), jnp.float32)
    r = route(jnp.asarray(rng.normal(size=(2, 9, e)), jnp.float32), top_k=2, renormalize=True)
    for grouped_matmul in ("blocked", "ragged_dot"):
        f = jax.jit(lambda p, x, r, slot_of: experts_routed(p, x, r, "swiglu", jnp.float32,
                                                              "auto", grouped_matmul, slot_of))
        # reference: the same compiled function on the stacked experts, expert e in slot e
        want = f(experts, x, r, jnp.arange(e, dtype=jnp.int32))
        sizes = []
        for perm in (rng.permutation(e), rng.permutation(e), rng.permutation(e)):
            for slot, expert in enumerate(perm):
                pool.load((layer, int(expert)), slot)
            got = f(pool.arrays, x, r, jnp.asarray(pool.slot_table(layer)))
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            sizes.append(f._cache_size())
        assert sizes[0] == sizes[-1]                  # new slot contents: no new compilation
    assert pool._update._cache_size() == compiled and pool.loads == 6 * e + 1
    assert pool.bytes_loaded == (6 * e + 1) * store.expert_bytes


def test_slot_bookkeeping_on_move_and_replace(store):
    layer = store.layers[0]
    pool = SlotPool(store, 2 * store.expert_bytes)
    pool.load((layer, 0), 0)
    pool.load((layer, 0), 1)                              # moved: slot 0 is free again
    assert pool.first_free_slot() == 0 and pool.resident() == {(layer, 0)}
    assert pool.slot_table(layer)[0] == 1
    pool.load((layer, 1), 1)                              # replaced: expert 0 not resident
    assert pool.slot_table(layer).tolist()[:2] == [-1, 1]
    assert pool.resident() == {(layer, 1)} and not pool.is_resident((layer, 0))


def test_load_takes_the_first_free_slot_and_free_releases_it(store):
    layer = store.layers[0]
    pool = SlotPool(store, 2 * store.expert_bytes)
    pool.load((layer, 2))
    pool.load((layer, 3))
    assert pool.slot_table(layer).tolist()[2:4] == [0, 1] and pool.first_free_slot() is None
    with pytest.raises(ValueError, match="no free slot"):
        pool.load((layer, 0))
    pool.free((layer, 2))
    assert pool.first_free_slot() == 0 and pool.resident() == {(layer, 3)}
    pool.load((layer, 0))
    assert pool.slot_table(layer).tolist()[:4] == [0, -1, -1, 1]
    with pytest.raises(KeyError, match="not in the pool"):
        pool.free((layer, 2))
