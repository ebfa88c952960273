"""The LLaVA-layout VLM: vision tower -> projector -> image tokens spliced into the text -> decoder.

Shape letters: B batch, T text length (placeholders included), N image tokens, D decoder width.

Each image placeholder id in the text stands for one image token: a prompt with one image holds N
consecutive placeholders (see `moex.tokenizer.ByteTokenizer.encode`); the k-th placeholder of a row
is replaced by the k-th projected image token of that row's image. A row with no placeholders is
text-only; with `images=None` the model is a plain LM.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from moex.config import VLMConfig
from moex.nn.decoder import Decoder
from moex.nn.vision import Projector, VisionTower


def splice_image_tokens(x, is_image, image_tokens):
    """x (B, T, D); is_image (B, T) bool; image_tokens (B, N, D) -> x with placeholders replaced."""
    n = image_tokens.shape[1]
    k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n - 1)                 # (B, T)
    gathered = jnp.take_along_axis(image_tokens, k[:, :, None], axis=1)
    return jnp.where(is_image[:, :, None], gathered.astype(x.dtype), x)


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

    def encode_images(self, images):
        """images (B, H, W, C) -> (image tokens (B, N, D), aux of vision + projector MoE blocks)."""
        feats, aux_v = self.vision(images)
        tokens, aux_p = self.projector(feats)
        return tokens, aux_v + aux_p

    def embed(self, tokens, images=None):
        """tokens (B, T) int; images (B, H, W, C) or None -> (decoder inputs (B, T, D): the token
        embeddings with each row's image tokens spliced in at its placeholders, aux of the
        vision + projector MoE blocks)."""
        x = self.decoder.embed(tokens)
        if images is None:
            return x, []
        if self.cfg.vision is None:
            raise ValueError(f"{self.cfg.name} is a text-only model; got images")
        image_tokens, aux_vision = self.encode_images(images)
        return splice_image_tokens(x, tokens == self.cfg.image_token_id, image_tokens), aux_vision

    def __call__(self, tokens, token_mask, images=None, cache=None, last_only: bool = False,
                 fresh_cache: bool = False):
        """tokens (B, T) int; token_mask (B, T); images (B, H, W, C) or None.

        Returns (logits, new cache, aux) where aux = {'decoder': [...], 'vision': [...]}.
        """
        x, aux_vision = self.embed(tokens, images)
        if images is None and self.is_initializing() and self.cfg.vision is not None:
            c = self.cfg.vision             # create the vision params from a dummy image
            self.encode_images(jnp.zeros((1, c.image_size, c.image_size, c.channels)))
        logits, cache, aux = self.decoder(x, token_mask, cache, last_only, fresh_cache)
        return logits, cache, {"decoder": aux, "vision": aux_vision}
