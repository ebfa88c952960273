"""Batched generation: greedy matches the full forward, decode compiles once, stop tokens, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.generate import Generator, Sampling, sample
from tests.helpers import image_prompts, jitted_forward, random_images, tiny


def test_greedy_generation_matches_argmax_of_full_forward():
    cfg, model, params = tiny("tiny-hard")
    tokens, mask = image_prompts(cfg, [2, 7], seed=4)
    images = random_images(cfg, 2)
    gen = Generator(model)
    out = gen(params, tokens, mask, images, max_new_tokens=6, stop_tokens=())
    assert out.tokens.shape == (2, 6) and not out.stopped.any()
    # Re-derive each token by a full forward over prompt + tokens so far.
    fwd = jitted_forward("tiny-hard")
    seq, m = tokens, mask
    for i in range(6):
        nxt = np.asarray(jnp.argmax(fwd(params, seq, m, images)[:, -1], -1))
        np.testing.assert_array_equal(out.tokens[:, i], nxt)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        m = np.concatenate([m, np.ones((2, 1), np.int32)], 1)


def test_decode_compiles_once_across_steps_and_calls():
    cfg, model, params = tiny("tiny-soft")
    gen = Generator(model)
    tokens, mask = image_prompts(cfg, [3, 5], seed=5)
    images = random_images(cfg, 2)
    gen(params, tokens, mask, images, max_new_tokens=8, stop_tokens=())
    tokens2, mask2 = image_prompts(cfg, [5, 1], seed=6)
    gen(params, tokens2, mask2, images, max_new_tokens=8, stop_tokens=())
    assert gen.traces == {"prefill": 1, "decode": 1}


def test_stop_tokens_end_rows_and_pad_after():
    cfg, model, params = tiny("tiny-dense")
    gen = Generator(model)
    tokens, mask = image_prompts(cfg, [3, 4], seed=7)
    images = random_images(cfg, 2)
    free = gen(params, tokens, mask, images, max_new_tokens=6, stop_tokens=())
    stop = int(free.tokens[0, 2])                   # row 0 emits this at step 2
    out = gen(params, tokens, mask, images, max_new_tokens=6, stop_tokens=(stop,))
    first = np.argmax(free.tokens[0] == stop)
    assert out.stopped[0] and out.num_generated[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (out.tokens[0, first + 1:] == cfg.pad_token_id).all()


def test_sampling_is_seeded_and_top_p_restricts():
    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.05, 0.05]] * 64))
    draws = [np.asarray(sample(logits, Sampling(1.0, 0.8, seed=3), step)) for step in range(20)]
    assert set(np.concatenate(draws).tolist()) <= {0, 1}           # top-p 0.8 keeps {0, 1}
    assert set(np.concatenate(draws).tolist()) == {0, 1}
    again = [np.asarray(sample(logits, Sampling(1.0, 0.8, seed=3), step)) for step in range(20)]
    np.testing.assert_array_equal(np.stack(draws), np.stack(again))
    other = np.asarray(sample(logits, Sampling(1.0, 0.8, seed=4), 0))
    assert not np.array_equal(other, draws[0])
    np.testing.assert_array_equal(sample(logits, Sampling(), 0), 0)  # greedy
    top1 = np.asarray(sample(logits, Sampling(1.0, 0.5, seed=1), 0))
    assert (top1 == 0).all()


def test_sampled_generation_reproducible():
    cfg, model, params = tiny("tiny-hard")
    gen = Generator(model)
    tokens, mask = image_prompts(cfg, [3, 3], seed=8)
    images = random_images(cfg, 2)
    s = Sampling(temperature=0.9, top_p=0.95, seed=11)
    a = gen(params, tokens, mask, images, max_new_tokens=5, sampling=s, stop_tokens=())
    b = gen(params, tokens, mask, images, max_new_tokens=5, sampling=s, stop_tokens=())
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_bad_arguments_are_named():
    cfg, model, params = tiny("tiny-dense")
    gen = Generator(model)
    tokens, mask = image_prompts(cfg, [3], seed=9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen(params, tokens, mask, random_images(cfg, 1), max_new_tokens=0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gen(params, tokens, mask[:, 1:], random_images(cfg, 1), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
