"""Basic layers: norms, rotary embedding, dense MLPs, activations.

Shape letters: B batch, T query length, S key length, D model width, F MLP width,
H heads, K kv heads, Dh head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from moex.config import Activation
from moex.nn import sharding

DType = jnp.dtype


def activation_fn(name: Activation):
    """Elementwise activation for non-gated MLPs (swiglu uses silu on its gate)."""
    return {
        "swiglu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }[name]


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = sharding.param(self, "scale", nn.initializers.ones, (x.shape[-1],),
                               self.param_dtype, (None,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = sharding.param(self, "scale", nn.initializers.ones, (d,), self.param_dtype, (None,))
        bias = sharding.param(self, "bias", nn.initializers.zeros, (d,), self.param_dtype, (None,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype, param_dtype, name: str | None = None):
    cls = RMSNorm if kind == "rms" else LayerNorm
    return cls(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def rope_frequencies(rotary_dim: int, mrope_section: tuple[int, ...] = (),
                     mrope_interleaved: bool = True, axial: bool = False):
    """Per rotated pair i < rotary_dim / 2: (which position axis turns it (half,) int32, the
    exponent e_i of its frequency theta^(-e_i) (half,) float32), as static numpy arrays.

      plain   axis 0, e_i = 2i / rotary_dim                                    (Llama)
      mrope   the plain exponents; axis t / h / w (0 / 1 / 2) per pair: interleaved (Qwen3-VL)
              pair i takes h if i % 3 == 1 and i < 3 * section[1], w if i % 3 == 2 and
              i < 3 * section[2], else t; in sections (Qwen2-VL) the first section[0] pairs
              take t, the next section[1] h, the rest w
      axial   2D (Qwen3-VL's vision tower): the first half of the pairs turn with the row, the
              second half with the column, pair j of each half with e_j = 4j / rotary_dim
    """
    half = rotary_dim // 2
    i = np.arange(half)
    if axial:
        q = half // 2
        return (i >= q).astype(np.int32), (np.float32(2) * (i % q) / np.float32(half)).astype(np.float32)
    exponent = (i.astype(np.float32) * np.float32(2.0) / np.float32(rotary_dim)).astype(np.float32)
    axis = np.zeros(half, np.int32)
    if mrope_section:
        t, h, w = mrope_section
        if mrope_interleaved:
            axis[(i % 3 == 1) & (i < 3 * h)] = 1
            axis[(i % 3 == 2) & (i < 3 * w)] = 2
        else:
            axis[t:t + h], axis[t + h:] = 1, 2
    return axis, exponent


def rope_angles(positions, theta: float, rotary_dim: int, **layout):
    """positions (B, T) int, or (B, T, A) with one position per axis (mrope: t, h, w; axial:
    row, column) -> angles (B, T, rotary_dim / 2) float32 (layout: rope_frequencies). (B, T)
    positions turn every axis alike (text tokens), which for mrope equals plain RoPE."""
    axis, exponent = rope_frequencies(rotary_dim, **layout)
    freq = 1.0 / (theta ** jnp.asarray(exponent))
    p = positions.astype(jnp.float32)
    if p.ndim == 3:
        p = jnp.take(p, jnp.asarray(axis), axis=2) if p.shape[2] > 1 else p
    else:
        p = p[..., None]
    return p * freq


def apply_rope(x, positions, theta: float, rotary_dim: int, interleaved: bool = False,
               **layout):
    """Rotary embedding on the first `rotary_dim` of Dh.

    x: (B, T, H, Dh); positions: (B, T) int or (B, T, A) per-axis positions (rope_angles;
    layout: mrope_section / mrope_interleaved / axial). Frequency i rotates the pair (x_i,
    x_{i+half}) (HF "rotate_half", Llama layout) or, interleaved, the pair (x_{2i}, x_{2i+1})
    (DeepSeek-V2).
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    angle = rope_angles(positions, theta, rotary_dim, **layout)       # (B, T, half)
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    xr, xp = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        rotated = rotated.reshape(xr.shape)
    else:
        # x * cos + rotate_half(x) * sin on full-width tables: the same products and sums as
        # [x1 cos - x2 sin, x2 cos + x1 sin], but XLA's CPU backend runs this form faster
        # than a concatenation of products of halves (measured: ARCHITECTURE.md, "Attention")
        cos = jnp.concatenate([cos, cos], axis=-1)
        sin = jnp.concatenate([-sin, sin], axis=-1)
        swapped = jnp.concatenate([xr[..., half:], xr[..., :half]], axis=-1)
        rotated = xr * cos + swapped * sin
    return jnp.concatenate([rotated.astype(x.dtype), xp], axis=-1)


class Dense(nn.Module):
    """y = x @ kernel (+ bias); kernel (D_in, D_out) with logical names `axes` (the bias takes
    the second)."""

    features: int
    use_bias: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    axes: tuple[str | None, str | None] = ("embed", "mlp")

    @nn.compact
    def __call__(self, x):
        kernel = sharding.param(self, "kernel", nn.initializers.lecun_normal(),
                                (x.shape[-1], self.features), self.param_dtype, self.axes)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = sharding.param(self, "bias", nn.initializers.zeros, (self.features,),
                                  self.param_dtype, self.axes[1:])
            y = y + bias.astype(self.dtype)
        return y


class MLP(nn.Module):
    """Dense MLP. swiglu: down(silu(gate(x)) * up(x)); otherwise: down(act(up(x)))."""

    hidden: int
    activation: Activation = "swiglu"
    use_bias: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    out_dim: int | None = None    # default: the input width

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.out_dim or x.shape[-1]
        if self.activation == "swiglu":
            h = jax.nn.silu(Dense(self.hidden, name="gate", **kw)(x)) * Dense(self.hidden, name="up", **kw)(x)
        else:
            h = activation_fn(self.activation)(Dense(self.hidden, name="up", **kw)(x))
        h = sharding.constrain(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
        return Dense(d, name="down", axes=("mlp", "embed"), **kw)(h)
