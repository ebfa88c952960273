"""Routing decisions and auxiliary losses on small hand-made inputs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moex.nn.routing import expert_capacity, load_balance_loss, route, router_z_loss

LN3 = math.log(3.0)


def test_topk_renormalise_or_not():
    logits = jnp.log(jnp.asarray([[[0.5, 0.3, 0.2]]]))            # probs 0.5 0.3 0.2
    r = route(logits, top_k=2, renormalize=True)
    np.testing.assert_array_equal(r.expert_ids[0, 0], [0, 1])
    np.testing.assert_allclose(r.weights[0, 0], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-6)
    r = route(logits, top_k=2, renormalize=False)                   # Qwen1.5 / DeepSeek
    np.testing.assert_allclose(r.weights[0, 0], [0.5, 0.3], rtol=1e-6)


def test_capacity_drops_in_k_major_token_order():
    # 4 tokens, 2 experts, top-2 -> every token picks both; C = ceil(0.5 * 4 * 2 / 2) = 2.
    # Token order of first choices: t0->e0, t1->e1, t2->e0, t3->e0. Expert 0 gets t0, t2 (first
    # choices), t3's first choice is dropped; expert 1 gets t1 (first), then second choices in
    # token order: t0 -> e1 fits (slot 1), later ones are dropped.
    logits = jnp.asarray([[[2.0, 1.0], [1.0, 2.0], [2.0, 1.0], [2.0, 1.0]]])
    r = route(logits, top_k=2, renormalize=False, capacity_factor=0.5)
    assert r.capacity == 2
    np.testing.assert_array_equal(r.kept[0], [[True, True], [True, False], [True, False],
                                              [False, False]])
    np.testing.assert_array_equal(r.position[0, :, 0], [0, 0, 1, 2])
    assert float(r.weights[0, 3].sum()) == 0.0


def test_padding_takes_no_capacity():
    logits = jnp.asarray([[[1.0, 0.0]] * 3])
    mask = jnp.asarray([[False, True, True]])
    r = route(logits, top_k=1, renormalize=False, capacity_factor=2 / 3, token_mask=mask)
    assert r.capacity == 1                                   # ceil(2/3 * 3 / 2) = 1
    np.testing.assert_array_equal(r.kept[0, :, 0], [False, True, False])


def test_capacity_formula():
    assert expert_capacity(10, 4, 2, None) == 10
    assert expert_capacity(10, 4, 2, 1.25) == math.ceil(1.25 * 10 * 2 / 4)
    assert expert_capacity(1, 64, 1, 1.0) == 1


def test_load_balance_loss_hand_computed():
    # probs: t0, t1 = [.75, .25]; t2 = [.25, .75]; top-1 -> f = [2/3, 1/3],
    # P = [1.75/3, 1.25/3]; loss = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9.
    logits = jnp.asarray([[[LN3, 0.0], [LN3, 0.0], [0.0, LN3]]])
    r = route(logits, top_k=1, renormalize=True)
    assert float(load_balance_loss(r)) == pytest.approx(9.5 / 9, rel=1e-6)
    # Masking t1 out: f = [1/2, 1/2], P = [1/2, 1/2] -> 2 * (1/4 + 1/4) = 1.
    mask = jnp.asarray([[True, False, True]])
    assert float(load_balance_loss(r, mask)) == pytest.approx(1.0, rel=1e-6)


def test_z_loss_hand_computed():
    # logsumexp([ln 3, 0]) = ln 4 for every token.
    logits = jnp.asarray([[[LN3, 0.0], [0.0, LN3]]])
    r = route(logits, top_k=1, renormalize=True)
    assert float(router_z_loss(r)) == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_load_balance_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 24, 8)).astype(np.float32)
    ours = load_balance_loss(route(jnp.asarray(logits), top_k=2, renormalize=True))
    theirs = load_balancing_loss_func((torch.from_numpy(logits[0]),), 8, 2)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
