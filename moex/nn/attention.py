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

from moex.nn import sharding
from moex.nn.layers import RMSNorm, apply_rope

HEADS = ("batch", "length", "heads", "kv")   # logical names of q, k, v, per-head outputs
NEG_INF = -1e30  # finite, so fully-masked rows (left padding) stay finite instead of NaN


def _allowed(q_slot, k_slot, window):
    """(T,) query slots, (S,) key slots -> (T, S): not in the future, inside the window."""
    delta = q_slot[:, None] - k_slot[None, :]
    ok = delta >= 0
    return ok if window is None else ok & (delta < window)


def causal_mask(valid, window: int | None = None):
    """(B, T) bool validity -> (B, T, T): key valid, not in the future (and within `window`).

    Left padding keeps a row's real tokens in consecutive slots, so slot distance is position
    distance for every pair of real tokens."""
    t = jnp.arange(valid.shape[1])
    return valid[:, None, :] & _allowed(t, t, window)[None]


def cached_causal_mask(cache_valid, index, t, window: int | None = None):
    """Mask for T new queries at cache slots [index, index+T) over all S_max cache slots."""
    s_max = cache_valid.shape[1]
    return cache_valid[:, None, :] & _allowed(index + jnp.arange(t), jnp.arange(s_max), window)[None]


def write_cache(cache, k, v, index):
    """Write new entries k, v (B, T, ., .) at slot `index` of the layer cache {'k', 'v'}.
    Returns (all cached k, all cached v, the new cache); with cache None, (k, v, None)."""
    if cache is None:
        return k, v, None
    k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    return k, v, {"k": k, "v": v}


def qk_normalize(q, k, kind: str, eps: float, dtype, param_dtype):
    """RMSNorm on q (B, T, H, Dh) and k: per head ('head', Qwen3) or over all heads ('full',
    OLMoE). Call inside a compact module; creates q_norm / k_norm params."""
    if kind == "none":
        return q, k
    out = []
    for name, x in (("q_norm", q), ("k_norm", k)):
        norm = RMSNorm(eps, dtype, param_dtype, name=name)
        out.append(norm(x) if kind == "head" else norm(x.reshape(x.shape[:2] + (-1,))).reshape(x.shape))
    return tuple(out)


CAUSAL_CHUNK = 128   # query rows per block when queries start at key slot 0 (see attend)


def attend(q, k, v, mask, scale, causal_from_zero: bool = False):
    """q (B, T, H, Dk), k (B, S, K, Dk), v (B, S, K, Dv), mask (B, T, S) -> (B, T, H, Dv) fp32.

    causal_from_zero (static): query t sits at key slot t and the mask is causal, so a block of
    queries [a, b) needs only keys [0, b). The queries are then processed in blocks of
    CAUSAL_CHUNK rows over their key prefix, skipping the masked upper triangle (about half the
    FLOPs and memory at long T), and on the CPU backend one batch row at a time (lax.map): a
    row's scores stay in cache, faster than all rows at once (ARCHITECTURE.md). Results equal
    the one-block computation on every row that has a valid key (fully masked padding rows
    differ, as both are meaningless).
    """
    t = q.shape[1]
    if not causal_from_zero or t <= CAUSAL_CHUNK:
        return _attend(q, k, v, mask, scale)
    if jax.default_backend() == "cpu" and q.shape[0] > 1:
        one_row = lambda a: _causal_blocks(*(x[None] for x in a), scale)[0]
        return jax.lax.map(one_row, (q, k, v, mask))
    return _causal_blocks(q, k, v, mask, scale)


def _causal_blocks(q, k, v, mask, scale):
    """attend() with causal_from_zero: query blocks of CAUSAL_CHUNK rows over their key prefix."""
    qh, kh, vh = _heads_first(q, k, v)
    blocks = [_attend_heads(qh[:, :, :, a:a + CAUSAL_CHUNK], kh[:, :, :a + CAUSAL_CHUNK],
                            vh[:, :, :a + CAUSAL_CHUNK],
                            mask[:, a:a + CAUSAL_CHUNK, :a + CAUSAL_CHUNK], scale)
              for a in range(0, q.shape[1], CAUSAL_CHUNK)]
    return _heads_back(jnp.concatenate(blocks, axis=3))


def _attend(q, k, v, mask, scale):
    """One block of attention (all queries over all keys)."""
    return _heads_back(_attend_heads(*_heads_first(q, k, v), mask, scale))


def _heads_first(q, k, v):
    """Heads in front of the sequence axes: q (B, K, G, T, Dk), k (B, K, S, Dk), v (B, K, S, Dv)
    in fp32, so both einsums of _attend_heads are plain batched matmuls (on the CPU backend ~2x
    faster than letting XLA contract the (B, T, K, G, D) layout directly)."""
    b, t, h, dk = q.shape
    kv = k.shape[2]
    q = q.astype(jnp.float32).reshape(b, t, kv, h // kv, dk).transpose(0, 2, 3, 1, 4)
    k = k.astype(jnp.float32).transpose(0, 2, 1, 3)
    v = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    return q, k, v


def _heads_back(out):
    """(B, K, G, T, Dv) -> (B, T, H, Dv)."""
    b, kv, g, t, dv = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, dv)


def _attend_heads(q, k, v, mask, scale):
    """q (B, K, G, T, Dk), k (B, K, S, Dk), v (B, K, S, Dv), mask (B, T, S) -> (B, K, G, T, Dv)."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


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
    qk_norm: str = "none"
    norm_eps: float = 1e-6
    rope_interleaved: bool = False
    mrope_section: tuple[int, ...] = ()   # rope layout (moex.nn.layers.rope_frequencies)
    mrope_interleaved: bool = True
    rope_axial: bool = False              # 2D positions (row, column): Qwen3-VL's vision tower

    def _proj(self, name, x, heads, use_bias):
        d = x.shape[-1]
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        w = sharding.param(self, name, init, (d, heads, self.head_dim), self.param_dtype,
                           ("embed", "heads", "kv"))
        y = jnp.einsum("btd,dhe->bthe", x.astype(self.dtype), w.astype(self.dtype))
        if use_bias:
            b = sharding.param(self, name + "_bias", nn.initializers.zeros,
                               (heads, self.head_dim), self.param_dtype, ("heads", "kv"))
            y = y + b.astype(self.dtype)
        return y

    @nn.compact
    def __call__(self, x, mask, positions=None, cache=None, cache_index=None,
                 causal_from_zero: bool = False):
        """x (B, T, D); mask (B, T, S); positions (B, T) for RoPE, or (B, T, A) per axis.

        cache: None or {'k','v'}: (B, S_max, K, Dh); new k/v are written at cache_index.
        Returns (out (B, T, D), new cache or None).
        """
        b, t, d = x.shape
        h, kv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self._proj("q", x, h, self.qkv_bias)
        k = self._proj("k", x, kv, self.qkv_bias)
        v = self._proj("v", x, kv, self.qkv_bias)
        q, k = qk_normalize(q, k, self.qk_norm, self.norm_eps, self.dtype, self.param_dtype)
        if self.rope_theta is not None:
            rot = int(dh * self.rotary_pct)
            rot -= rot % 2
            layout = dict(mrope_section=self.mrope_section,
                          mrope_interleaved=self.mrope_interleaved, axial=self.rope_axial)
            q = apply_rope(q, positions, self.rope_theta, rot, self.rope_interleaved, **layout)
            k = apply_rope(k, positions, self.rope_theta, rot, self.rope_interleaved, **layout)
        q, k, v = (sharding.constrain(a, HEADS) for a in (q, k, v))
        k, v, cache = write_cache(cache, k, v, cache_index)
        out = attend(q, k, v, mask, dh ** -0.5, causal_from_zero).astype(self.dtype)
        out = sharding.constrain(out, HEADS)
        init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        wo = sharding.param(self, "o", init, (h, dh, d), self.param_dtype,
                            ("heads", "kv", "embed"))
        y = jnp.einsum("bthe,hed->btd", out, wo.astype(self.dtype))
        if self.out_bias:
            y = y + sharding.param(self, "o_bias", nn.initializers.zeros, (d,), self.param_dtype,
                                   ("embed",)).astype(self.dtype)
        return y, cache
