"""Batched generation for encoder-decoder models (moex.nn.encdec): encode once, then decode steps.

Shape letters: B batch, S encoder length (right-padded), N new tokens, V vocabulary.

    gen = Seq2SeqGenerator(cfg)                  # compiles start once per (B, S), the step once
    out = gen(params, tokens, mask, max_new_tokens=16)     # a moex.generate.GenerationResult

The start runs the encoder, computes every decoder block's cross-attention keys and values once
(they stay in the cache for the whole request) and the first decoder step from the decoder
start token; each later step feeds the previous token at the next decoder slot.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import EncDecConfig
from moex.generate import GREEDY, GenerationResult, Sampling, decode_loop, sample, stop_ids
from moex.model import build
from moex.nn import sharding
from moex.nn.encdec import init_cache


class Seq2SeqGenerator:
    """The jitted start (encoder + first decoder step) and decode step of one model."""

    def __init__(self, cfg: EncDecConfig, params=None, plan: sharding.Plan | None = None):
        self.cfg, self.params, self.plan = cfg, params, plan
        self.model = build(cfg)
        self.traces = collections.Counter()
        self._start = jax.jit(self._start_impl, static_argnames=("max_len", "sampling"))
        self._step = jax.jit(self._step_impl, static_argnames=("sampling",), donate_argnums=(1,))

    def _apply(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)

    def _start_impl(self, params, tokens, mask, *, max_len, sampling):
        self.traces["start"] += 1
        m = self.model
        with sharding.use(self.plan):
            enc, _ = self._apply(params, tokens, mask, method=m.encode)
            cross = self._apply(params, enc, method=m.cross_cache)
            cache = init_cache(self.cfg, tokens.shape[0], max_len, cross, mask,
                               jnp.dtype(self.cfg.dtype))
            first = jnp.full((tokens.shape[0], 1), self.cfg.decoder_start_token_id, jnp.int32)
            logits, cache, _ = self._apply(params, first, cache, method=m.decode)
        logits = logits[:, 0]
        return cache, sample(logits, sampling, 0), logits

    def _step_impl(self, params, cache, last, done, step, stop, *, sampling):
        self.traces["decode"] += 1
        with sharding.use(self.plan):
            logits, cache, _ = self._apply(params, last[:, None], cache, method=self.model.decode)
        logits = logits[:, 0]
        nxt = jnp.where(done, self.cfg.pad_token_id, sample(logits, sampling, step))
        return cache, nxt, done | jnp.isin(nxt, stop), logits

    def start(self, params, tokens, mask, *, max_len: int, sampling: Sampling = GREEDY):
        """Returns (cache, first generated token (B,), its logits (B, V))."""
        return self._start(params, jnp.asarray(tokens), jnp.asarray(mask), max_len=max_len,
                           sampling=sampling)

    def step(self, params, cache, last, done, step: int, stop, sampling: Sampling = GREEDY):
        return self._step(params, cache, last, done, jnp.int32(step), stop, sampling=sampling)

    def __call__(self, params, tokens, mask, *, max_new_tokens: int,
                 sampling: Sampling = GREEDY, stop_tokens=None,
                 return_logits: bool = False) -> GenerationResult:
        tokens, mask = check_inputs(self.cfg, tokens, mask, max_new_tokens)
        stop = jnp.asarray(stop_ids(self.cfg, stop_tokens))
        first = self.start(params, tokens, mask, max_len=max_new_tokens, sampling=sampling)
        return decode_loop(self.cfg, lambda *a: self.step(params, *a, sampling), first, stop,
                           max_new_tokens, return_logits)

    def generate(self, tokens, token_mask, max_new_tokens: int, stop_at_eos: bool = True):
        """Greedy ids (B, N) with the params given at construction; without stop_at_eos every
        row runs N steps (as transformers' generate with min_new_tokens = N)."""
        out = self(self.params, tokens, token_mask, max_new_tokens=max_new_tokens,
                   stop_tokens=None if stop_at_eos else ())
        return out.tokens


def check_inputs(cfg: EncDecConfig, tokens, mask, max_new_tokens: int):
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"encoder tokens and mask must both be (B, S); found {tokens.shape} "
                         f"and {mask.shape}")
    if not mask.any(axis=1).all():
        raise ValueError(f"every encoder row needs a real token; rows "
                         f"{np.flatnonzero(~mask.any(axis=1)).tolist()} are all padding")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, found {max_new_tokens}")
    if max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} > {cfg.name}'s max_seq_len "
                         f"{cfg.max_seq_len}")
    return tokens, mask
