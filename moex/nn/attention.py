"""Multi-head attention with grouped-query heads and an optional KV cache.

Shapes: B batch, T query length, S key length (T without a cache, S_max with one), D model width,
H query heads, K kv heads (H = K * G), Dh head width.

The mask is built once per forward by the caller (`causal_mask` / `cached_causal_mask`) and shared
by every layer; it is (B, T, S) bool, True where a query may attend to a key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from moex.nn.layers import apply_rope

NEG_INF = -1e30  # finite, so fully-masked rows (left padding) stay finite instead of NaN


def causal_mask(valid):
    """(B, T) bool validity -> (B, T, T): key valid and not in the future."""
    t = valid.shape[1]
    future = jnp.arange(t)[None, :] > jnp.arange(t)[:, None]
    return valid[:, None, :] & ~future[None]


def cached_causal_mask(cache_valid, index, t):
    """Mask for T new queries at cache slots [index, index+T) over all S_max cache slots."""
    s_max = cache_valid.shape[1]
    q_slot = index + jnp.arange(t)
    return cache_valid[:, None, :] & (jnp.arange(s_max)[None, :] <= q_slot[:, None])[None]


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = 10000.0   # None: no rotary embedding (vision tower)
    rotary_pct: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _proj(self, name, x, heads, use_bias):
        d = x.shape[-1]
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        w = self.param(name, init, (d, heads, self.head_dim), self.param_dtype)
        y = jnp.einsum("btd,dhe->bthe", x.astype(self.dtype), w.astype(self.dtype))
        if use_bias:
            b = self.param(name + "_bias", nn.initializers.zeros, (heads, self.head_dim),
                           self.param_dtype)
            y = y + b.astype(self.dtype)
        return y

    @nn.compact
    def __call__(self, x, mask, positions=None, cache=None, cache_index=None):
        """x (B, T, D); mask (B, T, S); positions (B, T) for RoPE.

        cache: None or {'k','v'}: (B, S_max, K, Dh); new k/v are written at cache_index.
        Returns (out (B, T, D), new cache or None).
        """
        b, t, d = x.shape
        h, kv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self._proj("q", x, h, self.qkv_bias)
        k = self._proj("k", x, kv, self.qkv_bias)
        v = self._proj("v", x, kv, self.qkv_bias)
        if self.rope_theta is not None:
            rot = int(dh * self.rotary_pct)
            rot -= rot % 2
            q = apply_rope(q, positions, self.rope_theta, rot)
            k = apply_rope(k, positions, self.rope_theta, rot)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                             (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                             (0, cache_index, 0, 0))
            cache = {"k": k, "v": v}
        g = h // kv
        q = q.reshape(b, t, kv, g, dh)
        scores = jnp.einsum("btkgh,bskh->bkgts", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores / jnp.sqrt(jnp.float32(dh))
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32))
        out = out.reshape(b, t, h, dh).astype(self.dtype)
        init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        wo = self.param("o", init, (h, dh, d), self.param_dtype)
        y = jnp.einsum("bthe,hed->btd", out, wo.astype(self.dtype))
        if self.out_bias:
            y = y + self.param("o_bias", nn.initializers.zeros, (d,), self.param_dtype).astype(self.dtype)
        return y, cache
