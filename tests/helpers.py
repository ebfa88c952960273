"""Shared builders for tests: tiny presets, their params and left-padded prompts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import get_config
from moex.model import build, init_params
from moex.tokenizer import ByteTokenizer, left_pad

TINY = ("tiny-dense", "tiny-hard", "tiny-soft")


@functools.lru_cache(maxsize=None)
def tiny(name):
    """(cfg, model, params) for a preset, initialised once per test session."""
    cfg = get_config(name)
    return cfg, build(cfg), init_params(cfg, seed=0)


@functools.lru_cache(maxsize=None)
def jitted_forward(name):
    _, model, _ = tiny(name)
    return jax.jit(lambda p, t, m, im: model.apply({"params": p}, t, m, im)[0])


def random_images(cfg, b, seed=0):
    v = cfg.vision
    return jnp.asarray(np.random.default_rng(seed).normal(
        size=(b, v.image_size, v.image_size, v.channels)), jnp.float32)


def image_prompts(cfg, lengths, seed=0, with_image=True):
    """Left-padded rows of the given text lengths, each starting with one image's placeholders."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    head = tok.encode("<image>", num_image_tokens=cfg.vision.num_image_tokens) if with_image \
        else [tok.bos_id]
    seqs = [head + rng.integers(0, 256, n).tolist() for n in lengths]
    return left_pad(seqs, tok.pad_id)
