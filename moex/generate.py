"""Batched generation: one prefill, then decode steps over a KV cache.

Shape letters: B batch, T prompt length (left-padded), N new tokens, V vocabulary.

    gen = Generator(model)                       # compiles prefill once per (B, T), decode once
    out = gen(params, tokens, mask, images, max_new_tokens=16,
              sampling=Sampling(temperature=0.7, top_p=0.9, seed=0), stop_tokens=(eos,))
    out.tokens  # (B, N) int32, pad after a row stopped

Prompts are left-padded (`moex.tokenizer.left_pad`) so every row's last prompt token sits at the
same cache slot and one scalar cache index serves the whole batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import require_decoder_lm
from moex.nn import sharding
from moex.nn.decoder import init_cache
from moex.nn.vlm import VLM, check_placeholders


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, found "
                             f"temperature={self.temperature}, top_p={self.top_p}")


GREEDY = Sampling()


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray          # (B, N) generated ids, pad_id after the stop token
    num_generated: np.ndarray   # (B,) tokens up to and including the stop token
    stopped: np.ndarray         # (B,) bool: hit a stop token
    logits: np.ndarray | None   # (B, N, V) if requested


def sample(logits, sampling: Sampling, step):
    """logits (B, V) float32 -> token ids (B,). `step` seeds the draw (fold_in)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_p = jnp.sort(probs, axis=-1)[:, ::-1]
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p      # mass of strictly more likely ids
        keep_sorted = before < sampling.top_p                  # always keeps the top id
        threshold = jnp.min(jnp.where(keep_sorted, sorted_p, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(probs >= threshold, logits, -jnp.inf)
    key = jax.random.fold_in(jax.random.key(sampling.seed), step)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Holds the jitted prefill and decode step of one model; counts traces for tests.

    With a sharding plan (moex.nn.sharding.Plan) both run on its mesh: pass params placed by
    `moex.model.shard_params(cfg, params, plan)`; prompts are split over the batch axes."""

    def __init__(self, model: VLM, plan: sharding.Plan | None = None):
        require_decoder_lm(model.cfg, "Generator (moex.seq2seq.Seq2SeqGenerator runs "
                                      "encoder-decoders)")
        self.model = model
        self.plan = plan
        self.traces = collections.Counter()
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len", "sampling"))
        self._step = jax.jit(self._step_impl, static_argnames=("sampling",), donate_argnums=(1,))

    # -- the two compiled pieces ----------------------------------------------------------------
    def _prefill_impl(self, params, tokens, mask, images, *, max_len, sampling):
        self.traces["prefill"] += 1
        cfg = self.model.cfg
        with sharding.use(self.plan):
            cache = init_cache(cfg.decoder, tokens.shape[0], max_len, jnp.dtype(cfg.dtype))
            logits, cache, _ = self.model.apply({"params": params}, tokens, mask, images, cache,
                                                last_only=True, fresh_cache=True)
        logits = logits[:, 0]
        return cache, sample(logits, sampling, 0), logits

    def _step_impl(self, params, cache, last, done, step, stop, *, sampling):
        self.traces["decode"] += 1
        ones = jnp.ones((last.shape[0], 1), jnp.int32)
        with sharding.use(self.plan):
            logits, cache, _ = self.model.apply({"params": params}, last[:, None], ones, None,
                                                cache)
        logits = logits[:, 0]
        nxt = sample(logits, sampling, step)
        nxt = jnp.where(done, self.model.cfg.pad_token_id, nxt)
        return cache, nxt, done | jnp.isin(nxt, stop), logits

    # -- public pieces, also used by tests and benchmarks ----------------------------------------
    def prefill(self, params, tokens, mask, images=None, *, max_len: int, sampling=GREEDY):
        """Returns (cache, first sampled token (B,), last-position logits (B, V))."""
        tokens, mask, images = sharding.put_batch(self.plan, (np.asarray(tokens),
                                                              np.asarray(mask), images))
        return self._prefill(params, jnp.asarray(tokens), jnp.asarray(mask), images,
                             max_len=max_len, sampling=sampling)

    def step(self, params, cache, last, done, step: int, stop, sampling=GREEDY):
        return self._step(params, cache, last, done, jnp.int32(step), stop, sampling=sampling)

    def __call__(self, params, tokens, mask, images=None, *, max_new_tokens: int,
                 sampling: Sampling = GREEDY, stop_tokens=None, return_logits: bool = False,
                 max_len: int | None = None) -> GenerationResult:
        cfg = self.model.cfg
        tokens, mask = check_inputs(cfg, tokens, mask, images, max_new_tokens)
        b, t = tokens.shape
        max_len = max_len or t + max_new_tokens
        if max_len < t + max_new_tokens:
            raise ValueError(f"max_len {max_len} < prompt {t} + max_new_tokens {max_new_tokens}")
        stop = jnp.asarray(stop_ids(cfg, stop_tokens))
        first = self.prefill(params, tokens, mask, images, max_len=max_len, sampling=sampling)
        return decode_loop(cfg, lambda *a: self.step(params, *a, sampling), first, stop,
                           max_new_tokens, return_logits)


def decode_loop(cfg, step, first, stop, max_new_tokens: int,
                return_logits: bool) -> GenerationResult:
    """The decode steps after a prefill's `first` = (cache, token (B,), logits (B, V)):
    `step(cache, last, done, index, stop) -> (cache, token, done, logits)` until every row
    stopped or N tokens are out (Generator and moex.seq2seq.Seq2SeqGenerator)."""
    cache, tok, logits = first
    done = jnp.isin(tok, stop)
    out, all_logits = [tok], [logits] if return_logits else None
    for i in range(1, max_new_tokens):
        if bool(done.all()):
            break
        cache, tok, done, logits = step(cache, tok, done, i, stop)
        out.append(tok)
        if return_logits:
            all_logits.append(logits)
    return result(cfg, out, stop, max_new_tokens, all_logits)


def check_inputs(cfg, tokens, mask, images, max_new_tokens: int):
    """(tokens, mask) as int32 arrays, after checking shapes, image placeholders and N."""
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens and mask must both be (B, T); found {tokens.shape} and "
                         f"{mask.shape}")
    if cfg.vision is not None:
        if images is not None:
            cfg.vision.check_image_shape(np.shape(images))
        n = (cfg.vision.num_image_tokens if images is None
             else cfg.vision.tokens_for(*np.shape(images)[1:3]))
        check_placeholders(tokens, cfg.image_token_id, n, images is not None)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, found {max_new_tokens}")
    return tokens, mask


def stop_ids(cfg, stop_tokens) -> np.ndarray:
    """The stop token ids (default: EOS; none: -1, which never matches)."""
    ids = sorted(set(stop_tokens if stop_tokens is not None else (cfg.eos_token_id,)))
    return np.asarray(ids or [-1], np.int32)


def result(cfg, out: list, stop, max_new_tokens: int, logits: list | None) -> GenerationResult:
    """GenerationResult from the per-step sampled ids (each (B,)) and optional logits."""
    b = np.asarray(out[0]).shape[0]
    toks = np.full((b, max_new_tokens), cfg.pad_token_id, np.int32)
    toks[:, :len(out)] = np.stack([np.asarray(o) for o in out], axis=1)
    hit = np.isin(toks, np.asarray(stop))
    stopped = hit.any(axis=1)
    num = np.where(stopped, hit.argmax(axis=1) + 1, len(out))
    lg = np.stack([np.asarray(x) for x in logits], axis=1) if logits is not None else None
    return GenerationResult(toks, num, stopped, lg)


@functools.lru_cache(maxsize=16)
def generator_for(cfg, plan: sharding.Plan | None = None) -> Generator:
    """One Generator (and so one set of compiled functions) per config (and plan)."""
    return Generator(VLM(cfg), plan)
