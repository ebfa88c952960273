"""The LLaVA-layout VLM: vision tower -> projector -> image tokens spliced into the text -> decoder.

Shape letters: B batch, T text length (placeholders included), N image tokens, D decoder width.

Each image placeholder id in the text stands for one image token: a prompt with one image holds N
consecutive placeholders (see `moex.tokenizer.ByteTokenizer.encode`); the k-th placeholder of a row
is replaced by the k-th projected image token of that row's image. A row with no placeholders is
text-only; with `images=None` the model is a plain LM.

Qwen3-VL adds two things on the decoder side (both only when images are given):
  multimodal RoPE  a token has (t, h, w) positions: text tokens count as usual, an image's
                   tokens sit at (s, s + row, s + column) of its merged grid, with s the position
                   where the image starts, and the text after it continues at s + max(rows,
                   columns) (multimodal_positions)
  DeepStack        the vision tower's tap features, each merged by its own DeepstackMerger, are
                   added to the outputs of decoder layers 0, 1, ... at the image tokens
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from moex.config import VLMConfig
from moex.nn.decoder import Decoder
from moex.nn.vision import DeepstackMerger, Projector, VisionTower


def splice_image_tokens(x, is_image, image_tokens):
    """x (B, T, D); is_image (B, T) bool; image_tokens (B, N, D) -> x with placeholders replaced."""
    n = image_tokens.shape[1]
    k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n - 1)                 # (B, T)
    gathered = jnp.take_along_axis(image_tokens, k[:, :, None], axis=1)
    return jnp.where(is_image[:, :, None], gathered.astype(x.dtype), x)


def multimodal_positions(is_image, valid, grid: tuple[int, int], start=None):
    """Qwen-VL's (t, h, w) RoPE positions: is_image, valid (B, T) bool; grid (rows, columns) of
    merged image tokens (static; every image in the batch has it); start (B,) the rows' first
    position (the cache's, default 0) -> (B, T, 3) int32 (0 at padding).

    Text tokens take the next position on all three axes. The n = rows * columns tokens of an
    image starting at position s take (s, s + r, s + c) for its token at (r, c), and the image
    advances the next position by max(rows, columns), not n. Any number of images per row."""
    rows, cols = grid
    n, extent = rows * cols, max(rows, cols)
    is_image = is_image & valid
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    seen = jnp.cumsum(is_image, axis=1, dtype=jnp.int32)             # image tokens so far
    k = jnp.maximum(seen - 1, 0)
    images_before = jnp.where(is_image, k // n, seen // n)
    within = jnp.where(is_image, k % n, 0)
    base = rank - within - images_before * n + images_before * extent
    pos = jnp.stack([base, base + within // cols, base + within % cols], axis=-1)
    if start is not None:
        pos = pos + start[:, None, None].astype(jnp.int32)
    return jnp.where(valid[:, :, None], pos, 0)


def check_placeholders(tokens, image_token_id: int, num_image_tokens: int, has_images: bool):
    """Host-side check (call before jit): every row holds 0 or exactly N placeholders."""
    counts = (np.asarray(tokens) == image_token_id).sum(axis=1)
    bad = [(r, int(c)) for r, c in enumerate(counts) if c not in (0, num_image_tokens)]
    if bad:
        raise ValueError(f"each row must hold 0 or {num_image_tokens} image placeholders "
                         f"(id {image_token_id}); found (row, count) {bad}")
    if counts.any() and not has_images:
        raise ValueError("tokens contain image placeholders but no images were given")


class VLM(nn.Module):
    cfg: VLMConfig

    def setup(self):
        c = self.cfg
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.decoder = Decoder(c.decoder, dtype, pdtype)
        if c.vision is not None:
            self.vision = VisionTower(c.vision, dtype, pdtype)
            self.projector = Projector(c.projector, c.decoder.d_model, dtype, pdtype)
            self.deepstack = [DeepstackMerger(c.projector, c.decoder.d_model, c.vision.norm_eps,
                                              dtype, pdtype, name=f"deepstack_{j}")
                              for j in range(len(c.vision.deepstack_layers))]

    def encode_images(self, images):
        """images (B, H, W, C) -> (image tokens (B, N, D), aux of vision + projector MoE blocks,
        DeepStack features: one (B, N, D) per deepstack layer)."""
        feats, aux_v, taps = self.vision(images)
        tokens, aux_p = self.projector(feats)
        return tokens, aux_v + aux_p, [m(t) for m, t in zip(self.deepstack, taps)]

    def embed(self, tokens, images=None):
        """tokens (B, T) int; images (B, H, W, C) or None -> (decoder inputs (B, T, D): the token
        embeddings with each row's image tokens spliced in at its placeholders, aux of the
        vision + projector MoE blocks)."""
        x, _, _, aux = self.inputs(tokens, images)
        return x, aux

    def inputs(self, tokens, images=None, token_mask=None, start=None):
        """Everything the decoder layers take besides the mask: (x (B, T, D) as in embed,
        positions (B, T, 3) for multimodal RoPE or None, DeepStack injections (tuple of
        (B, T, D), zero outside image tokens), aux of the vision + projector MoE blocks).
        token_mask (B, T) (default all valid) and start (B,) (the cache's next positions)
        place the multimodal positions."""
        x = self.decoder.embed(tokens)
        if images is None:
            return x, None, (), []
        if self.cfg.vision is None:
            raise ValueError(f"{self.cfg.name} is a text-only model; got images")
        image_tokens, aux_vision, deep = self.encode_images(images)
        is_image = tokens == self.cfg.image_token_id
        x = splice_image_tokens(x, is_image, image_tokens)
        inject = tuple(splice_image_tokens(jnp.zeros_like(x), is_image, f) for f in deep)
        positions = None
        if self.cfg.decoder.mrope_section:
            v = self.cfg.vision
            side = v.patch_size * v.spatial_merge
            valid = jnp.ones(tokens.shape, bool) if token_mask is None else token_mask.astype(bool)
            positions = multimodal_positions(is_image, valid, (images.shape[1] // side,
                                                              images.shape[2] // side), start)
        return x, positions, inject, aux_vision

    def __call__(self, tokens, token_mask, images=None, cache=None, last_only: bool = False,
                 fresh_cache: bool = False):
        """tokens (B, T) int; token_mask (B, T); images (B, H, W, C) or None.

        Returns (logits, new cache, aux) where aux = {'decoder': [...], 'vision': [...]}.
        """
        x, positions, inject, aux_vision = self.inputs(
            tokens, images, token_mask, None if cache is None else cache["pos"])
        if images is None and self.is_initializing() and self.cfg.vision is not None:
            c = self.cfg.vision             # create the vision params from a dummy image
            self.encode_images(jnp.zeros((1, c.image_size, c.image_size, c.channels)))
        logits, cache, aux = self.decoder(x, token_mask, cache, last_only, fresh_cache,
                                          positions, inject)
        return logits, cache, {"decoder": aux, "vision": aux_vision}
