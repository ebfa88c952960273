"""Encoder-decoder LM in the T5 / Switch Transformers layout (config: moex.config.EncDecConfig).

Shape letters: B batch, S encoder length, T decoder (new) tokens, S_max decoder cache length,
D width, H heads, Dh head width, V vocabulary.

    encoder  embed(tokens) -> blocks [x + attn(norm(x)); x + ffn(norm(x))] -> final norm
    decoder  embed(tokens) -> blocks [x + self_attn(norm(x)); x + cross_attn(norm(x), encoder);
             x + ffn(norm(x))] -> final norm -> tied embedding (x * D**-0.5) or LM head

Attention has no biases and no 1/sqrt(Dh) scaling; a relative position bias (moex.nn.relative),
learned in each stack's first block, is added to every block's self-attention scores of that
stack (the decoder's is causal). The FFNs are ReLU MLPs or Switch MoE blocks (moex.nn.moe.HardMoE:
top-1, capacity per sequence), chosen per block by the stack's MoEConfig.

Encoder positions are slots (right padding, as T5 tokenizers pad). Decoding rows advance in
lockstep from the decoder start token, so decoder positions are cache slots too. The cache:
  index     ()             int32  decoder slots filled so far
  layers    tuple of {'k','v'}: (B, S_max, H, Dh), the decoder's self-attention, per block
  cross     tuple of {'k','v'}: (B, S, H, Dh), keys and values of the encoder's output for each
            block's cross-attention, computed once per request (`cross_cache`)
  enc_valid (B, S) bool  the encoder's real tokens
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from moex.config import EncDecConfig
from moex.nn import sharding
from moex.nn.layers import RMSNorm
from moex.nn.moe import make_ffn
from moex.nn.relative import position_bias

NEG_INF = -1e30
HEADS = ("batch", "length", "heads", "kv")
ACT = ("batch", "length", "act_embed")


class T5Attention(nn.Module):
    """q, k, v (D, H, Dh) and o (H, Dh, D), no biases, unscaled scores plus an additive bias."""

    d_model: int
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        d, h, dh = self.d_model, self.num_heads, self.head_dim
        init = nn.initializers.normal(d ** -0.5)
        proj = lambda name: sharding.param(self, name, init, (d, h, dh), self.param_dtype,
                                           ("embed", "heads", "kv"))
        self.q, self.k, self.v = proj("q"), proj("k"), proj("v")
        self.o = sharding.param(self, "o", nn.initializers.normal((h * dh) ** -0.5), (h, dh, d),
                                self.param_dtype, ("heads", "kv", "embed"))

    def _project(self, w, x):
        y = jnp.einsum("btd,dhe->bthe", x.astype(self.dtype), w.astype(self.dtype))
        return sharding.constrain(y, HEADS)

    def keys_values(self, x):
        """x (B, S, D) -> (k, v) (B, S, H, Dh)."""
        return self._project(self.k, x), self._project(self.v, x)

    def attend(self, x, k, v, mask, bias=None):
        """Queries from x (B, T, D) over k, v (B, S, H, Dh); mask (B, T, S) bool; bias
        (1 | B, H, T, S) or None -> (B, T, D)."""
        q = self._project(self.q, x).astype(jnp.float32)
        scores = jnp.einsum("bthe,bshe->bhts", q, k.astype(jnp.float32))
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask[:, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhts,bshe->bthe", probs, v.astype(jnp.float32)).astype(self.dtype)
        out = sharding.constrain(out, HEADS)
        return jnp.einsum("bthe,hed->btd", out, self.o.astype(self.dtype))

    def __call__(self, x, mask, bias=None):
        """Self-attention without a cache."""
        k, v = self.keys_values(x)
        return self.attend(x, k, v, mask, bias)


class Block(nn.Module):
    """One encoder (cross=False) or decoder (cross=True) block. Its steps are methods so the
    offload engine can run its own expert compute between `ffn_input` and the residual add."""

    cfg: EncDecConfig
    layer: int
    cross: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        norm = lambda: RMSNorm(c.norm_eps, self.dtype, self.param_dtype)
        attn = lambda: T5Attention(c.d_model, c.num_heads, c.head_dim, self.dtype,
                                   self.param_dtype)
        self.attn_norm, self.attn = norm(), attn()
        if self.cross:
            self.cross_norm, self.cross_attn = norm(), attn()
        self.ffn_norm = norm()
        moe = c.decoder_moe if self.cross else c.encoder_moe
        self.ffn = make_ffn(moe, self.layer, c.ffn_dim, c.activation, False, self.dtype,
                            self.param_dtype, causal=False, name=None)

    def self_attend(self, x, mask, bias, cache=None, index=None):
        """x + attn(norm(x)); with a layer cache {'k','v'} (B, S_max, H, Dh) the new keys and
        values are written at slot `index`. Returns (x, new layer cache or None)."""
        h = self.attn_norm(x)
        k, v = self.attn.keys_values(h)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                             (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                             (0, index, 0, 0))
            cache = {"k": k, "v": v}
        return x + self.attn.attend(h, k, v, mask, bias), cache

    def cross_attend(self, x, cross_kv, enc_valid):
        """x + cross_attn(norm(x)) over the encoder's keys and values (B, S, H, Dh)."""
        mask = jnp.broadcast_to(enc_valid[:, None, :], (x.shape[0], x.shape[1],
                                                         enc_valid.shape[1]))
        return x + self.cross_attn.attend(self.cross_norm(x), cross_kv["k"], cross_kv["v"], mask)

    def cross_keys_values(self, enc):
        k, v = self.cross_attn.keys_values(enc)
        return {"k": k, "v": v}

    def ffn_input(self, x):
        return self.ffn_norm(x)

    def feed_forward(self, x, token_mask):
        """x + ffn(norm(x)) -> (x, the FFN's aux)."""
        f, aux = self.ffn(self.ffn_input(x), token_mask)
        return x + f, aux


class Stack(nn.Module):
    """The blocks of the encoder or the decoder, the relative bias table and the final norm."""

    cfg: EncDecConfig
    decoder: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        n = c.decoder_layers if self.decoder else c.encoder_layers
        self.blocks = [Block(c, i, self.decoder, self.dtype, self.param_dtype, name=f"layer_{i}")
                       for i in range(n)]
        self.relative_bias = sharding.param(self, "relative_bias",
                                            nn.initializers.normal(c.d_model ** -0.5),
                                            (c.relative_buckets, c.num_heads),
                                            self.param_dtype, (None, "heads"))
        self.final_norm = RMSNorm(c.norm_eps, self.dtype, self.param_dtype)

    def bias(self, query_pos, key_pos):
        c = self.cfg
        return position_bias(self.relative_bias, query_pos, key_pos, not self.decoder,
                             c.relative_buckets, c.relative_max_distance)


def encoder_mask(valid):
    """(B, S) real tokens -> (B, S, S): every query attends to the real keys."""
    return jnp.broadcast_to(valid[:, None, :], (valid.shape[0],) + (valid.shape[1],) * 2)


def decoder_mask(index, t: int, s: int, batch: int):
    """T queries at decoder slots index .. index + T - 1 over S key slots: causal."""
    q = index + jnp.arange(t)
    return jnp.broadcast_to(jnp.arange(s)[None, :] <= q[:, None], (batch, t, s))


def init_cache(cfg: EncDecConfig, batch: int, max_len: int, cross: tuple, enc_valid,
               dtype=jnp.float32) -> dict:
    shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
    return {"index": jnp.zeros((), jnp.int32),
            "layers": tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                            for _ in range(cfg.decoder_layers)),
            "cross": tuple(cross), "enc_valid": enc_valid.astype(bool)}


class EncoderDecoder(nn.Module):
    cfg: EncDecConfig

    def setup(self):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.dtype = dt
        self.embedding = sharding.param(self, "embed", nn.initializers.normal(1.0),
                                        (c.vocab_size, c.d_model), pdt, ("vocab", "embed"))
        self.encoder = Stack(c, False, dt, pdt)
        self.decoder = Stack(c, True, dt, pdt)
        if not c.tie_embeddings:
            self.lm_head = sharding.param(self, "lm_head", nn.initializers.normal(1.0),
                                          (c.d_model, c.vocab_size), pdt, ("embed", "vocab"))

    def embed(self, tokens):
        table = sharding.constrain(self.embedding, (None, "act_embed"))
        return sharding.constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), ACT)

    def encode(self, tokens, token_mask):
        """tokens, token_mask (B, S) -> (encoder output (B, S, D), aux per block)."""
        valid = token_mask.astype(bool)
        x = self.embed(tokens)
        pos = jnp.arange(tokens.shape[1])
        mask, bias = encoder_mask(valid), self.encoder.bias(pos, pos)
        aux = []
        for block in self.encoder.blocks:
            x, _ = block.self_attend(x, mask, bias)
            x, a = block.feed_forward(x, valid)
            x = sharding.constrain(x, ACT)
            aux.append(a)
        return self.encoder.final_norm(x), aux

    def cross_cache(self, enc):
        """Each decoder block's cross-attention keys and values of the encoder output: computed
        once per request."""
        return tuple(block.cross_keys_values(enc) for block in self.decoder.blocks)

    def decode(self, tokens, cache, last_only: bool = False):
        """tokens (B, T) at decoder slots cache['index'] ... -> (logits (B, T | 1, V) float32,
        new cache, aux per block)."""
        b, t = tokens.shape
        index = cache["index"]
        s_max = cache["layers"][0]["k"].shape[1]
        mask = decoder_mask(index, t, s_max, b)
        bias = self.decoder.bias(index + jnp.arange(t), jnp.arange(s_max))
        x, new_layers, aux = self.embed(tokens), [], []
        for block, lc, ckv in zip(self.decoder.blocks, cache["layers"], cache["cross"]):
            x, lc = block.self_attend(x, mask, bias, lc, index)
            x = block.cross_attend(x, ckv, cache["enc_valid"])
            x, a = block.feed_forward(x, None)
            x = sharding.constrain(x, ACT)
            new_layers.append(lc)
            aux.append(a)
        logits = self.head(x[:, -1:] if last_only else x)
        return logits, {**cache, "index": index + t, "layers": tuple(new_layers)}, aux

    def decode_full(self, tokens, enc, enc_valid):
        """Teacher forcing: decoder tokens (B, T) over the encoder output (B, S, D) without a
        cache -> (logits (B, T, V) float32, aux per block)."""
        b, t = tokens.shape
        pos = jnp.arange(t)
        mask, bias = decoder_mask(0, t, t, b), self.decoder.bias(pos, pos)
        x, aux = self.embed(tokens), []
        valid = enc_valid.astype(bool)
        for block in self.decoder.blocks:
            x, _ = block.self_attend(x, mask, bias)
            x = block.cross_attend(x, block.cross_keys_values(enc), valid)
            x, a = block.feed_forward(x, None)
            x = sharding.constrain(x, ACT)
            aux.append(a)
        return self.head(x), aux

    def head(self, x):
        """Decoder hidden states (B, T, D) -> logits (B, T, V) float32."""
        x = self.decoder.final_norm(x)
        if self.cfg.tie_embeddings:
            x = x * (self.cfg.d_model ** -0.5)
            logits = jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype))
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.lm_head.astype(self.dtype))
        return sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, tokens, token_mask, decoder_tokens=None):
        """Encoder tokens and mask (B, S), decoder tokens (B, T) (default: the start token) ->
        (logits (B, T, V), {'encoder': aux per block, 'decoder': aux per block})."""
        if decoder_tokens is None:
            decoder_tokens = jnp.full((tokens.shape[0], 1), self.cfg.decoder_start_token_id,
                                      jnp.int32)
        enc, enc_aux = self.encode(tokens, token_mask)
        logits, dec_aux = self.decode_full(decoder_tokens, enc, token_mask)
        return logits, {"encoder": enc_aux, "decoder": dec_aux}
