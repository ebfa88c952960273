"""ViT / CLIP / SigLIP-style vision tower with optional MoE or Soft-MoE MLP blocks, and the projector.

Shape letters: B images, N patch tokens (+1 with a class token), D vision width, P patch size,
C channels. Images are (B, H, W, C) floats, already normalised.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from moex.config import ProjectorConfig, VisionConfig
from moex.nn.attention import Attention
from moex.nn.layers import Dense, LayerNorm, activation_fn
from moex.nn.moe import make_ffn


def patchify(images, patch: int):
    """(B, H, W, C) -> (B, N, P*P*C), row-major over patches, (py, px, c) within a patch.

    Like a stride-P 'valid' convolution, a remainder of H or W smaller than P is not covered
    (SigLIP-384/14: 27 x 27 patches).
    """
    b, h, w, c = images.shape
    h, w = h - h % patch, w - w % patch
    x = images[:, :h, :w].reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    layer: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        ln = lambda name: LayerNorm(c.norm_eps, self.dtype, self.param_dtype, name=name)
        attn = Attention(c.num_heads, c.num_heads, c.d_model // c.num_heads, rope_theta=None,
                         qkv_bias=True, out_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="attn")
        a, _ = attn(ln("attn_norm")(x), mask)
        x = x + a
        ffn = make_ffn(c.moe, self.layer, c.mlp_dim, c.activation, True, self.dtype,
                       self.param_dtype, causal=False)
        f, aux = ffn(ln("ffn_norm")(x))
        return x + f, aux


class VisionTower(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        """images (B, H, W, C) -> (features (B, N', D), aux per layer that ran)."""
        c = self.cfg
        if images.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise ValueError(f"expected images of shape (B, {c.image_size}, {c.image_size}, "
                             f"{c.channels}), found {tuple(images.shape)}")
        x = Dense(c.d_model, c.patch_bias, self.dtype, self.param_dtype, name="patch_embed")(
            patchify(images.astype(self.dtype), c.patch_size))
        b = x.shape[0]
        if c.class_token:
            cls = self.param("class_token", nn.initializers.normal(0.02), (c.d_model,),
                             self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.d_model)), x], 1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (x.shape[1], c.d_model),
                         self.param_dtype)
        x = x + pos.astype(self.dtype)
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, self.dtype, self.param_dtype, name="pre_norm")(x)
        mask = jnp.ones((b, x.shape[1], x.shape[1]), bool)       # bidirectional
        # Blocks after the feature layer exist (checkpoints carry them) but are skipped at apply.
        used = c.num_layers + c.feature_layer + 1
        aux = []
        for i in range(c.num_layers):
            if i < used or self.is_initializing():
                y, a = VisionBlock(c, i, self.dtype, self.param_dtype, name=f"layer_{i}")(x, mask)
                if i < used:
                    x = y
                    aux.append(a)
        if c.post_norm:
            post = LayerNorm(c.norm_eps, self.dtype, self.param_dtype, name="post_norm")
            y = post(x)
            if c.feature_layer == -1:
                x = y
        if c.class_token and c.drop_class_token:
            x = x[:, 1:]
        if c.spatial_merge > 1:
            x = merge_patches(x, c.image_size // c.patch_size, c.spatial_merge)
        return x, aux


def merge_patches(x, side: int, m: int):
    """(B, side*side, D) row-major patch features -> (B, (side/m)^2, m*m*D): each m x m block of
    neighbouring patches concatenated (row-major within the block), blocks row-major."""
    b, _, d = x.shape
    g = side // m
    x = x.reshape(b, g, m, g, m, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, m * m * d)


class Projector(nn.Module):
    """Vision width -> decoder width: Dense, activation, Dense (or an MoE of such MLPs)."""

    cfg: ProjectorConfig
    out_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        if c.moe.kind == "dense":
            kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
            h = activation_fn(c.activation)(Dense(c.hidden_dim, name="fc1", **kw)(x))
            return Dense(self.out_dim, name="fc2", **kw)(h), []
        ffn = make_ffn(c.moe, 0, c.hidden_dim, c.activation, True, self.dtype, self.param_dtype,
                       causal=False, out_dim=self.out_dim)
        y, aux = ffn(x)
        return y, [aux]
