"""ViT / CLIP / SigLIP-style vision tower with optional MoE or Soft-MoE MLP blocks, and the projector.

Shape letters: B images, N patch tokens (+1 with a class token), D vision width, P patch size,
C channels, T frames per patch. Images are (B, H, W, C) floats, already normalised.

Qwen3-VL's tower is the same blocks with four options of VisionConfig: patches of T = 2 frames
(an image is repeated over them), a learned G x G position grid resampled to each image's patch
grid (so images of any size whose sides are multiples of P * m run), 2D RoPE on each patch's
(row, column) in attention, and DeepStack taps: the outputs of some blocks, merged m x m and
passed through their own LayerNorm + MLP (DeepstackMerger), which the decoder adds to its first
layers' outputs at the image tokens. Its patch merger is post_norm + merge_patches + Projector.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from moex.config import ProjectorConfig, VisionConfig
from moex.nn.attention import Attention
from moex.nn import sharding
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


@functools.lru_cache(maxsize=64)
def grid_interpolation(grid: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling (corners aligned) of a learned grid x grid table to a rows x cols
    patch grid: (indices (rows * cols, 4) into the flattened table, weights (rows * cols, 4)
    float32), patches row-major. Row r samples the table at r * (grid - 1) / (rows - 1)."""
    def axis(n):
        src = np.arange(n, dtype=np.float32) * np.float32(grid - 1) / np.float32(max(n - 1, 1))
        low = np.floor(src)
        taps = low[:, None].astype(np.int64) + np.arange(2)
        weights = np.maximum(np.float32(1) - np.abs(src[:, None] - low[:, None] - np.arange(2)), 0)
        return np.minimum(taps, grid - 1), weights.astype(np.float32)
    (rt, rw), (ct, cw) = axis(rows), axis(cols)
    idx = (rt[:, None, :, None] * grid + ct[None, :, None, :]).reshape(rows * cols, 4)
    w = (rw[:, None, :, None] * cw[None, :, None, :]).reshape(rows * cols, 4)
    return idx.astype(np.int32), w.astype(np.float32)


def patch_positions(rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 2) int32 (row, column) of each patch, row-major."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int32)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    layer: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions=None):
        c = self.cfg
        ln = lambda name: LayerNorm(c.norm_eps, self.dtype, self.param_dtype, name=name)
        attn = Attention(c.num_heads, c.num_heads, c.d_model // c.num_heads,
                         rope_theta=c.rope_theta, qkv_bias=True, out_bias=True,
                         dtype=self.dtype, param_dtype=self.param_dtype, rope_axial=True,
                         name="attn")
        a, _ = attn(ln("attn_norm")(x), mask, positions)
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
        """images (B, H, W, C) -> (features (B, N', D'), aux per layer that ran, DeepStack taps:
        one (B, N', m*m*D) array per deepstack layer, merged like the features)."""
        c = self.cfg
        c.check_image_shape(images.shape)
        rows, cols = images.shape[1] // c.patch_size, images.shape[2] // c.patch_size
        patches = patchify(images.astype(self.dtype), c.patch_size)
        if c.temporal_patch > 1:          # one frame repeated: the patch is (t, py, px, c)
            patches = jnp.concatenate([patches] * c.temporal_patch, axis=-1)
        x = Dense(c.d_model, c.patch_bias, self.dtype, self.param_dtype, axes=(None, "embed"),
                  name="patch_embed")(patches)
        b = x.shape[0]
        if c.class_token:
            cls = sharding.param(self, "class_token", nn.initializers.normal(0.02), (c.d_model,),
                                 self.param_dtype, ("embed",))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.d_model)), x], 1)
        if c.pos_grid:
            table = sharding.param(self, "pos_embed", nn.initializers.normal(0.02),
                                   (c.pos_grid * c.pos_grid, c.d_model), self.param_dtype,
                                   (None, "embed"))
            idx, w = grid_interpolation(c.pos_grid, rows, cols)
            pos = jnp.sum(jnp.take(table.astype(self.dtype), jnp.asarray(idx), axis=0)
                          * jnp.asarray(w, self.dtype)[:, :, None], axis=1)
        else:
            pos = sharding.param(self, "pos_embed", nn.initializers.normal(0.02),
                                 (x.shape[1], c.d_model), self.param_dtype,
                                 (None, "embed")).astype(self.dtype)
        x = x + pos
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, self.dtype, self.param_dtype, name="pre_norm")(x)
        mask = jnp.ones((b, x.shape[1], x.shape[1]), bool)       # bidirectional
        positions = None
        if c.rope_theta is not None:
            positions = jnp.broadcast_to(jnp.asarray(patch_positions(rows, cols)),
                                         (b, rows * cols, 2))
        # Blocks after the feature layer exist (checkpoints carry them) but are skipped at apply.
        used = c.num_layers + c.feature_layer + 1
        aux, taps = [], []
        for i in range(c.num_layers):
            if i < used or self.is_initializing():
                y, a = VisionBlock(c, i, self.dtype, self.param_dtype, name=f"layer_{i}")(
                    x, mask, positions)
                if i < used:
                    x = sharding.constrain(y, ("batch", "length", "act_embed"))
                    aux.append(a)
                if i in c.deepstack_layers:
                    taps.append(merge_patches(y, rows, cols, c.spatial_merge))
        if c.post_norm:
            post = LayerNorm(c.norm_eps, self.dtype, self.param_dtype, name="post_norm")
            y = post(x)
            if c.feature_layer == -1:
                x = y
        if c.class_token and c.drop_class_token:
            x = x[:, 1:]
        if c.spatial_merge > 1:
            x = merge_patches(x, rows, cols, c.spatial_merge)
        return x, aux, taps


def merge_patches(x, rows: int, cols: int, m: int):
    """(B, rows*cols, D) row-major patch features -> (B, rows*cols/m^2, m*m*D): each m x m block
    of neighbouring patches concatenated (row-major within the block), blocks row-major."""
    if m == 1:
        return x
    b, _, d = x.shape
    gr, gc = rows // m, cols // m
    x = x.reshape(b, gr, m, gc, m, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gr * gc, m * m * d)


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


class DeepstackMerger(nn.Module):
    """One DeepStack tap's merger (Qwen3-VL): LayerNorm over the merged m*m*D features, then the
    projector's MLP. x (B, N', m*m*D) -> (B, N', out_dim)."""

    cfg: ProjectorConfig
    out_dim: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = LayerNorm(self.eps, self.dtype, self.param_dtype, name="norm")(x)
        return Projector(self.cfg, self.out_dim, self.dtype, self.param_dtype, name="mlp")(x)[0]
