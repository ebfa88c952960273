"""Causal decoder LM with a KV cache.

Shape letters: B batch, T new tokens, S_max cache length, D width, V vocabulary.

Padding is on the left. A token's RoPE position counts only the valid tokens before it, so a
left-padded row computes exactly what it would compute unpadded.

The cache is a plain dict:
  index  ()           int32  cache slots filled so far (same for every row)
  valid  (B, S_max)   bool   which slots hold a real token
  pos    (B,)         int32  next RoPE position of each row
  layers tuple of {'k','v'}: (B, S_max, K, Dh), one per layer
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from moex.config import DecoderConfig
from moex.nn import sharding
from moex.nn.attention import Attention, cached_causal_mask, causal_mask
from moex.nn.layers import Dense, make_norm
from moex.nn.mla import LatentAttention
from moex.nn.moe import make_ffn


def cache_entry_shapes(cfg: DecoderConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-token (heads, width) of the cached 'k' and 'v' of one layer. MLA caches its latent
    (1, R) as 'k' and the shared rotary key (1, Dr) as 'v'."""
    if cfg.attention == "mla":
        return (1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim)
    return (cfg.num_kv_heads, cfg.dim_per_head), (cfg.num_kv_heads, cfg.dim_per_head)


KV = ("batch", "length", "heads", "kv")     # logical names of a cached k / v


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    (kh, kd), (vh, vd) = cache_entry_shapes(cfg)
    return {
        "index": jnp.zeros((), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "pos": jnp.zeros((batch,), jnp.int32),
        "layers": tuple({"k": sharding.constrain(jnp.zeros((batch, max_len, kh, kd), dtype), KV),
                         "v": sharding.constrain(jnp.zeros((batch, max_len, vh, vd), dtype), KV)}
                        for _ in range(cfg.num_layers)),
    }


def kv_bytes_per_token(cfg: DecoderConfig, bytes_per_value: int = 2) -> int:
    (kh, kd), (vh, vd) = cache_entry_shapes(cfg)
    return cfg.num_layers * (kh * kd + vh * vd) * bytes_per_value


def attention_inputs(cfg: DecoderConfig, token_mask, cache=None):
    """(valid (B, T) bool, RoPE positions (B, T), attention mask (B, T, S), cache write index)
    for T new tokens, with or without a cache."""
    valid = token_mask.astype(bool)
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1      # index among the row's real tokens
    if cache is None:
        return valid, jnp.maximum(rank, 0), causal_mask(valid, cfg.sliding_window), None
    index = cache["index"]
    positions = jnp.maximum(cache["pos"][:, None] + rank, 0)
    cache_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
    mask = cached_causal_mask(cache_valid, index, valid.shape[1], cfg.sliding_window)
    return valid, positions, mask, index


def advance_cache(cache: dict, valid, new_layers, positions=None) -> dict:
    """The cache after T new tokens (valid (B, T)) were written by every layer. With explicit
    positions (B, T, A) (multimodal RoPE), a row's next position is one past the largest of its
    new tokens' positions (Qwen-VL: text after an image continues from the image's extent);
    otherwise it advances by the row's valid tokens."""
    index, t = cache["index"], valid.shape[1]
    if positions is None:
        pos = cache["pos"] + jnp.sum(valid, axis=1, dtype=jnp.int32)
    else:
        top = jnp.max(jnp.where(valid[:, :, None], positions, -1), axis=(1, 2)) + 1
        pos = jnp.where(valid.any(axis=1), top.astype(jnp.int32), cache["pos"])
    return {"index": index + t,
            "valid": jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index)),
            "pos": pos, "layers": tuple(new_layers)}


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); with parallel_block (Phi) one norm
    feeds both: x + attn(norm(x)) + ffn(norm(x)). `attend` and `ffn_input` are the steps of a
    sequential block, which the offload engine runs around its own expert compute."""

    cfg: DecoderConfig
    layer: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        norm = lambda: make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype)
        self.attn_norm = norm()
        if c.attention == "mla":
            self.attn = LatentAttention(c, self.dtype, self.param_dtype)
        else:
            self.attn = Attention(c.num_heads, c.num_kv_heads, c.dim_per_head, c.rope_theta,
                                  c.rotary_pct, c.qkv_bias, c.out_bias, self.dtype,
                                  self.param_dtype, c.qk_norm, c.norm_eps, c.rope_interleaved,
                                  c.mrope_section, c.mrope_interleaved)
        if not c.parallel_block:
            self.ffn_norm = norm()
        self.ffn = make_ffn(c.moe, self.layer, c.ffn_dim, c.activation, c.mlp_bias, self.dtype,
                            self.param_dtype, causal=True, name=None)

    def attend(self, x, mask, positions, cache=None, cache_index=None,
               causal_from_zero: bool = False):
        """x (B, T, D) -> (x + attention(attn_norm(x)), new layer cache or None)."""
        a, cache = self.attn(self.attn_norm(x), mask, positions, cache, cache_index,
                             causal_from_zero)
        return x + a, cache

    def ffn_input(self, x):
        """x (B, T, D) after attention -> the FFN's input ffn_norm(x) (sequential blocks)."""
        return self.ffn_norm(x)

    def __call__(self, x, mask, positions, token_mask, cache=None, cache_index=None,
                 causal_from_zero: bool = False):
        """Returns (x (B, T, D), new layer cache or None, the FFN's aux)."""
        if self.cfg.parallel_block:                # Phi: one norm feeds attention and MLP
            h = self.attn_norm(x)
            a, cache = self.attn(h, mask, positions, cache, cache_index, causal_from_zero)
            f, aux = self.ffn(h, token_mask)
            return x + a + f, cache, aux
        x, cache = self.attend(x, mask, positions, cache, cache_index, causal_from_zero)
        f, aux = self.ffn(self.ffn_input(x), token_mask)
        return x + f, cache, aux


class Decoder(nn.Module):
    cfg: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.embedding = sharding.param(self, "embed", nn.initializers.normal(0.02),
                                        (c.vocab_size, c.d_model), self.param_dtype,
                                        ("vocab", "embed"))
        self.layers = [DecoderLayer(c, i, self.dtype, self.param_dtype, name=f"layer_{i}")
                       for i in range(c.num_layers)]
        self.final_norm = make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, "final_norm")
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, c.lm_head_bias, self.dtype, self.param_dtype,
                                 axes=("embed", "vocab"))

    def embed(self, tokens):
        """tokens (B, T) int -> embeddings (B, T, D)."""
        table = sharding.constrain(self.embedding, (None, "act_embed"))   # gathered, as FSDP
        return sharding.constrain(jnp.take(table, tokens, axis=0).astype(self.dtype),
                                  ("batch", "length", "act_embed"))

    def __call__(self, x, token_mask, cache=None, last_only: bool = False,
                 fresh_cache: bool = False, positions=None, inject=()):
        """x (B, T, D) embedded inputs; token_mask (B, T) 1 for real tokens.

        fresh_cache (static): the cache is empty (index 0), as in a prefill; attention can then
        skip the key blocks that causality masks anyway.
        positions: None (each row's valid tokens counted from the cache's position), or
        explicit per-axis RoPE positions (B, T, A) (multimodal RoPE, moex.nn.vlm).
        inject: (B, T, D) arrays added to the outputs of layers 0, 1, ... (DeepStack).

        Returns (logits (B, T, V) or (B, 1, V) if last_only, new cache or None, aux per layer).
        """
        valid, counted, mask, index = attention_inputs(self.cfg, token_mask, cache)
        rope = counted if positions is None else positions
        layer_caches = [None] * len(self.layers) if cache is None else cache["layers"]
        aux, new_layers = [], []
        from_zero = cache is None or fresh_cache
        for i, (layer, lc) in enumerate(zip(self.layers, layer_caches)):
            x, lc, a = layer(x, mask, rope, valid, lc, index, from_zero)
            x = sharding.constrain(x, ("batch", "length", "act_embed"))
            if i < len(inject):
                x = x + inject[i].astype(x.dtype)
            new_layers.append(lc)
            aux.append(a)
        logits = self.head(x[:, -1:] if last_only else x)
        new_cache = None if cache is None else advance_cache(cache, valid, new_layers, positions)
        return logits, new_cache, aux

    def head(self, x):
        """Hidden states (B, T, D) -> logits (B, T, V) float32: the final norm, then the tied
        embedding or the LM head (with its bias, if any)."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype))
        else:
            logits = self.lm_head(x)
        return sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
