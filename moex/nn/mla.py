"""Multi-head latent attention (DeepSeek-V2): keys and values from a cached low-rank latent.

Shape letters: B batch, T new tokens, S key slots, D width, H heads, R kv_lora_rank (latent),
Dr rotary head width, Dn non-rotary q/k head width, Dv value head width.

Per token the cache holds the normalised latent c (R) and one rotary key k_pe (Dr) shared by all
heads -- (R + Dr) values instead of 2 * H * Dh. Each call expands the whole cache:
k = [c @ W_kb_nope ; k_pe], v = c @ W_kb_v (the reference formulation, not the absorbed one).
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from moex.config import DecoderConfig
from moex.nn.attention import attend, write_cache
from moex.nn import sharding
from moex.nn.layers import Dense, RMSNorm, apply_rope


class LatentAttention(nn.Module):
    cfg: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _w(self, name, shape, in_axes):
        init = nn.initializers.lecun_normal(in_axis=in_axes, out_axis=tuple(
            i for i in range(len(shape)) if i not in (in_axes if isinstance(in_axes, tuple) else (in_axes,))))
        axes = {"q": ("embed", "heads", "kv"), "q_b": (None, "heads", "kv"),
                "kv_b": (None, "heads", "kv"), "o": ("heads", "kv", "embed")}[name]
        return sharding.param(self, name, init, shape, self.param_dtype, axes).astype(self.dtype)

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, cache_index=None,
                 causal_from_zero: bool = False):
        c = self.cfg
        b, t, d = x.shape
        h, dn, dr, dv, r = (c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                            c.kv_lora_rank)
        x = x.astype(self.dtype)
        norm = lambda name: RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name=name)
        if c.q_lora_rank is None:
            q = jnp.einsum("btd,dhe->bthe", x, self._w("q", (d, h, dn + dr), 0))
        else:
            qa = norm("q_a_norm")(Dense(c.q_lora_rank, c.qkv_bias, self.dtype, self.param_dtype,
                                        axes=("embed", None), name="q_a")(x))
            q = jnp.einsum("btr,rhe->bthe", qa, self._w("q_b", (c.q_lora_rank, h, dn + dr), 0))
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        kv_a = Dense(r + dr, c.qkv_bias, self.dtype, self.param_dtype, axes=("embed", None),
                     name="kv_a")(x)
        latent = norm("kv_a_norm")(kv_a[..., :r])[:, :, None, :]               # (B, T, 1, R)
        k_pe = kv_a[..., None, r:]                                             # (B, T, 1, Dr)
        q_pe = apply_rope(q_pe, positions, c.rope_theta, dr, c.rope_interleaved)
        k_pe = apply_rope(k_pe, positions, c.rope_theta, dr, c.rope_interleaved)
        latent, k_pe, cache = write_cache(cache, latent, k_pe, cache_index)
        kv = jnp.einsum("bsr,rhe->bshe", latent[:, :, 0].astype(self.dtype),
                        self._w("kv_b", (r, h, dn + dv), 0))
        s = kv.shape[1]
        k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_pe.astype(self.dtype), (b, s, h, dr))], -1)
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        out = attend(q, k, kv[..., dn:], mask, (dn + dr) ** -0.5, causal_from_zero)
        out = out.astype(self.dtype)
        y = jnp.einsum("bthe,hed->btd", out, self._w("o", (h, dv, d), (0, 1)))
        if c.out_bias:
            y = y + sharding.param(self, "o_bias", nn.initializers.zeros, (d,), self.param_dtype,
                                   ("embed",)).astype(self.dtype)
        return y, cache
