"""The routing-path predictor (RPP): a small transformer that reads a prompt's token ids and
predicts, in one forward pass and before the first MoE layer runs, which experts every MoE layer
will pick for every prompt token and for the next `gen_len` generated tokens.

Shape letters: B batch, P prompt length, G generated positions, D d_model, L MoE layers,
E experts.

  encoder   token + position embeddings (+, with `state_width` W > 0, a projection of the
            target model's states entering its first MoE layer (B, P, W): for a VLM these carry
            the projected image tokens the placeholder ids hide), `enc_layers` bidirectional
            pre-norm blocks over the prompt (padding masked) -> a state per prompt token (B, P, D)
  decoder   one query per generated position (a learned embedding of its index 0..G-1),
            `dec_layers` blocks of self-attention among the queries and cross-attention to the
            encoder states -> (B, G, D)
  head      Dense(L * E) on both -> logits (B, P + G, L, E)

Defaults follow ExpertFlow (d_model 32, d_ff 2048). Trained with multi-label binary
cross-entropy (`bce_loss`) on routing traces: target[p, l, e] = 1 where token p picked expert e
in MoE layer l.

Encoder-decoder targets (`encoder_moe_layers` set): the prompt is the target's encoder input
and the G generated positions are its decoder positions (0 = the decoder start token); the
output still covers all L MoE layers (the encoder's first), but only the encoder's layers mean
anything at prompt positions and only the decoder's at generated ones (`layer_mask` in the loss;
the forecaster zeroes the others).
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moex.config import EncDecConfig
from moex.offload.store import expert_moe, moe_layers


@dataclasses.dataclass(frozen=True)
class RPPConfig:
    num_layers: int                    # L: MoE layers of the target model
    num_experts: int                   # E
    top_k: int                         # experts per token of the target model
    vocab_size: int = 260
    d_model: int = 32
    d_ff: int = 2048
    num_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 1
    max_prompt: int = 512
    gen_len: int = 32                  # G
    model: str = ""                    # the target model's name
    state_width: int = 0               # W: also read the first MoE layer's input states (0: no)
    encoder_moe_layers: int | None = None  # encoder-decoder target: how many of the L MoE layers
                                           # are the encoder's (listed first); None: decoder LM

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RPPConfig":
        return cls(**json.loads(text))

    @property
    def in_encoder(self):
        """(L,) bool numpy array of the encoder's MoE layers; None for a decoder-LM target."""
        if self.encoder_moe_layers is None:
            return None
        return np.arange(self.num_layers) < self.encoder_moe_layers

    @classmethod
    def for_model(cls, cfg, **kw) -> "RPPConfig":
        layers = moe_layers(cfg)
        if not layers:
            raise ValueError(f"{cfg.name} has no hard-MoE layers to predict")
        moe = expert_moe(cfg)
        encdec = _encoder_moe_layers(cfg)
        vocab = cfg.vocab_size if encdec is not None else cfg.decoder.vocab_size
        return cls(len(layers), moe.num_experts, moe.top_k, vocab, model=cfg.name,
                   encoder_moe_layers=encdec, **kw)

    def check_model(self, cfg) -> None:
        """Raise unless the target model has this predictor's (L, E) (and, for an
        encoder-decoder, its split of the MoE layers between encoder and decoder)."""
        want = (len(moe_layers(cfg)), expert_moe(cfg).num_experts)
        if want != (self.num_layers, self.num_experts):
            raise ValueError(f"routing-path predictor for (L, E) = ({self.num_layers}, "
                             f"{self.num_experts}) (trained on {self.model or 'unknown'}) does "
                             f"not match {cfg.name}: it has {want[0]} MoE layers and {want[1]} "
                             "experts")
        enc = _encoder_moe_layers(cfg)
        if enc != self.encoder_moe_layers:
            what = lambda n: "a decoder LM" if n is None else \
                f"an encoder-decoder with {n} encoder MoE layers"
            raise ValueError(f"routing-path predictor for {what(self.encoder_moe_layers)} "
                             f"(trained on {self.model or 'unknown'}) does not match "
                             f"{cfg.name}, {what(enc)}: train one on {cfg.name}'s traces")


def _encoder_moe_layers(cfg) -> int | None:
    """How many of an encoder-decoder's MoE layers are the encoder's; None for a decoder LM."""
    if not isinstance(cfg, EncDecConfig):
        return None
    return sum(1 for layer in moe_layers(cfg) if layer < cfg.encoder_layers)


class Block(nn.Module):
    cfg: RPPConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x, mask, memory=None, memory_mask=None):
        c = self.cfg
        attend = lambda name: nn.MultiHeadDotProductAttention(c.num_heads, name=name)
        h = nn.LayerNorm(name="norm_self")(x)
        x = x + attend("self")(h, h, mask=mask)
        if self.cross:
            h = nn.LayerNorm(name="norm_cross")(x)
            x = x + attend("cross")(h, memory, mask=memory_mask)
        h = nn.LayerNorm(name="norm_ffn")(x)
        return x + nn.Dense(c.d_model, name="ffn_out")(nn.gelu(nn.Dense(c.d_ff, name="ffn_in")(h)))


class RoutingPathPredictor(nn.Module):
    cfg: RPPConfig

    @nn.compact
    def __call__(self, tokens, token_mask, states=None):
        """tokens, token_mask (B, P), states (B, P, W) when state_width > 0 -> logits
        (B, P + G, L, E) float32."""
        c = self.cfg
        if (states is None) != (c.state_width == 0):
            raise ValueError(f"routing-path predictor with state_width {c.state_width} was "
                             f"given {'no' if states is None else 'input'} states")
        b, p = tokens.shape
        if p > c.max_prompt:
            raise ValueError(f"prompt of {p} tokens is longer than the predictor's max_prompt "
                             f"{c.max_prompt}")
        valid = token_mask.astype(bool)
        pos = jnp.clip(jnp.cumsum(valid, axis=1) - 1, 0)
        x = nn.Embed(c.vocab_size, c.d_model, name="embed")(tokens)
        x = x + nn.Embed(c.max_prompt, c.d_model, name="pos")(pos)
        if c.state_width:
            if states.shape[-1] != c.state_width:
                raise ValueError(f"states of width {states.shape[-1]}, the predictor reads "
                                 f"{c.state_width}")
            st = states.astype(jnp.float32)
            st = st * jax.lax.rsqrt(jnp.mean(st * st, -1, keepdims=True) + 1e-6)
            x = x + nn.Dense(c.d_model, name="state_in")(st)
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        pair = pair | jnp.eye(p, dtype=bool)[None, None]       # padding rows attend to themselves
        for i in range(c.enc_layers):
            x = Block(c, name=f"enc_{i}")(x, pair)
        memory = nn.LayerNorm(name="enc_norm")(x)
        q = nn.Embed(c.gen_len, c.d_model, name="gen")(jnp.arange(c.gen_len))
        q = jnp.broadcast_to(q, (b, c.gen_len, c.d_model))
        q_mask = jnp.ones((b, 1, c.gen_len, c.gen_len), bool)
        m_mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, c.gen_len, p))
        for i in range(c.dec_layers):
            q = Block(c, cross=True, name=f"dec_{i}")(q, q_mask, memory, m_mask)
        states = jnp.concatenate([memory, nn.LayerNorm(name="dec_norm")(q)], axis=1)
        logits = nn.Dense(c.num_layers * c.num_experts, name="head")(states)
        return logits.reshape(b, p + c.gen_len, c.num_layers, c.num_experts).astype(jnp.float32)


def bce_loss(logits, targets, mask, layer_mask=None):
    """Mean multi-label binary cross-entropy over (L, E) of the positions where mask is 1.

    logits, targets (B, N, L, E); mask (B, N); layer_mask (B, N, L) bool or None: only the
    (position, layer) pairs where it is True count (an encoder-decoder's positions run one
    stack's layers), each pair's mean over E weighing the same."""
    per = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
    if layer_mask is not None:
        weight = mask.astype(per.dtype)[..., None] * layer_mask.astype(per.dtype)
        return jnp.sum(per.mean(-1) * weight) / jnp.maximum(weight.sum(), 1.0)
    per = per.mean(axis=(-1, -2))
    mask = mask.astype(per.dtype)
    return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)


def init_predictor(cfg: RPPConfig, seed: int = 0):
    tokens = jnp.zeros((1, 4), jnp.int32)
    states = jnp.zeros((1, 4, cfg.state_width)) if cfg.state_width else None
    return jax.jit(RoutingPathPredictor(cfg).init)(jax.random.key(seed), tokens,
                                                   jnp.ones_like(tokens), states)["params"]
