"""Decoder causality and KV-cache decoding == one full forward, with left padding."""

import jax.numpy as jnp
import numpy as np
import pytest

from moex.generate import Generator
from tests.helpers import TINY, image_prompts, jitted_forward, random_images, tiny


@pytest.mark.parametrize("name", TINY)
def test_decoder_is_causal(name):
    cfg, _, params = tiny(name)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 24)).astype(np.int32)
    mask = np.ones_like(tokens)
    fwd = jitted_forward(name)
    base = fwd(params, tokens, mask, None)
    t = 11
    changed = tokens.copy()
    changed[:, t + 1:] = rng.integers(0, 256, (2, 24 - t - 1))
    after = fwd(params, changed, mask, None)
    np.testing.assert_allclose(after[:, :t + 1], base[:, :t + 1], atol=1e-5)
    assert not np.allclose(after[:, t + 1:], base[:, t + 1:], atol=1e-3)   # the change matters


@pytest.mark.parametrize("name", TINY)
def test_prefill_plus_decode_equals_full_forward(name):
    cfg, model, params = tiny(name)
    n_new = 5
    tokens, mask = image_prompts(cfg, [3, 9, 6], seed=1)        # left padding of 6, 0 and 3
    cont = np.random.default_rng(2).integers(0, 256, (3, n_new)).astype(np.int32)
    full_tokens = np.concatenate([tokens, cont], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
    images = random_images(cfg, 3)
    full = jitted_forward(name)(params, full_tokens, full_mask, images)

    gen = Generator(model)
    t = tokens.shape[1]
    cache, _, logits = gen.prefill(params, tokens, mask, images, max_len=t + n_new)
    np.testing.assert_allclose(logits, full[:, t - 1], atol=1e-4)
    done = jnp.zeros((3,), bool)
    stop = jnp.asarray([-1], jnp.int32)
    for i in range(n_new - 1):
        cache, _, _, logits = gen.step(params, cache, jnp.asarray(cont[:, i]), done, i + 1, stop)
        np.testing.assert_allclose(logits, full[:, t + i], atol=1e-4)
    assert gen.traces["decode"] == 1


def test_left_padding_does_not_change_a_row():
    cfg, _, params = tiny("tiny-hard")
    tokens, mask = image_prompts(cfg, [4, 10], seed=3)
    images = random_images(cfg, 2)
    fwd = jitted_forward("tiny-hard")
    batched = fwd(params, tokens, mask, images)
    pad = int((mask[0] == 0).sum())
    alone = fwd(params, tokens[:1, pad:], mask[:1, pad:], images[:1])
    np.testing.assert_allclose(batched[0, pad:], alone[0], atol=1e-4)


def test_gqa_heads_share_kv():
    cfg, _, params = tiny("tiny-dense")
    attn = params["decoder"]["layer_0"]["attn"]
    d, h, kv = cfg.decoder.d_model, cfg.decoder.num_heads, cfg.decoder.num_kv_heads
    assert attn["q"].shape == (d, h, d // h) and attn["k"].shape == (d, kv, d // h)
    assert h > kv
