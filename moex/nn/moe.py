"""Mixture-of-experts feed-forward blocks: hard (routed), soft (Soft MoE) and causal soft.

Shape letters: G groups (a sequence or an image), S (or M) tokens per group, D width, E experts,
P slots per expert, F expert width.

Every block maps (x (G, S, D), token_mask (G, S)) -> (y (G, S, D), aux) where aux is a dict of
values: the losses ('load_balance', 'z_loss') and, for routed blocks, the routing decision
('expert_ids' (G, S, K), 'weights' (G, S, K), 'probs' (G, S, E)), so traces can be recorded
from any forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from moex.config import MoEConfig
from moex.nn import sharding
from moex.nn.experts import (combine_pairs, experts_all, experts_dense, experts_soft_gated,
                             init_expert_params, pair_outputs)
from moex.nn import parallel
from moex.nn.layers import MLP, Dense
from moex.nn.routing import Router, Routing, load_balance_loss, router_z_loss

NEG_INF = -1e30


class ExpertParams(nn.Module):
    """Holds the stacked weights of E experts; returns them as a dict (see moex.nn.experts)."""

    num_experts: int
    dim: int
    activation: str
    use_bias: bool = False
    param_dtype: jnp.dtype = jnp.float32
    out_dim: int | None = None

    @nn.compact
    def __call__(self, d: int) -> dict:
        return init_expert_params(self, self.num_experts, d, self.dim, self.activation,
                                  self.use_bias, self.param_dtype, self.out_dim)


class SoftGatedParams(ExpertParams):
    """Expert weights of the causal soft block, expert-inner layout (see experts_soft_gated)."""

    @nn.compact
    def __call__(self, d: int) -> dict:
        return init_expert_params(self, self.num_experts, d, self.dim, self.activation,
                                  self.use_bias, self.param_dtype, self.out_dim,
                                  expert_inner=True)


class DenseFFN(nn.Module):
    """The plain MLP behind the same (y, aux) interface."""

    hidden: int
    activation: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dim: int | None = None

    @nn.compact
    def __call__(self, x, token_mask=None):
        return MLP(self.hidden, self.activation, self.use_bias, self.dtype, self.param_dtype,
                   self.out_dim, name="mlp")(x), {}


class HardMoE(nn.Module):
    """Router + top-k routed experts (+ shared experts). Its steps are methods, so the offload
    engine runs the same lines on its own expert weights: `route`, the experts' pair outputs
    (`moex.nn.experts.pair_outputs`), `combine`."""

    cfg: MoEConfig
    activation: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dim: int | None = None

    def setup(self):
        c = self.cfg
        self.router = Router(c.num_experts, c.top_k, c.renormalize, c.capacity_factor,
                             self.param_dtype, c.num_groups, c.topk_groups, c.routed_scaling,
                             c.expert_capacity, c.padding_takes_capacity, c.router_jitter)
        self.experts = ExpertParams(c.num_experts, c.expert_dim, self.activation, self.use_bias,
                                    self.param_dtype, self.out_dim)
        if c.num_shared_experts:
            self.shared_experts = MLP(c.num_shared_experts * c.shared_dim, self.activation,
                                      self.use_bias, self.dtype, self.param_dtype, self.out_dim)
            if c.shared_gate == "sigmoid":
                self.shared_gate = Dense(1, dtype=self.dtype, param_dtype=self.param_dtype,
                                         axes=("embed", None))

    def route(self, x, token_mask=None) -> Routing:
        """x (G, S, D) -> the routing decision (expert ids, weights, kept pairs)."""
        return self.router(x, token_mask)

    def combine(self, x, pairs, routing: Routing):
        """The block's output (G, S, Dout) from its pair outputs (G*S, K, Dout): the weighted
        sum over K, plus the shared experts on x (G, S, D)."""
        return self._add_shared(x, combine_pairs(pairs, routing.weights, self.dtype))

    def _add_shared(self, x, y):
        if self.cfg.num_shared_experts:
            shared = self.shared_experts(x)
            if self.cfg.shared_gate == "sigmoid":
                shared = jax.nn.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y.astype(self.dtype)

    def __call__(self, x, token_mask=None):
        c = self.cfg
        plan = None if self.is_initializing() else parallel.expert_parallel(c.num_experts)
        if plan is not None:                # experts split over the mesh: all-to-all dispatch
            y, routing = parallel.hard_moe_parallel(
                plan, x, token_mask, self.router.variables["params"]["kernel"],
                self.experts(x.shape[-1]), self.router.route_fn(), self.activation, self.dtype,
                c.grouped_matmul)
            return self._add_shared(x, y), self._aux(routing, token_mask)
        routing = self.route(x, token_mask)
        experts = self.experts(x.shape[-1])
        if c.compute == "dense":            # the one-hot reference combines in its einsum
            y = self._add_shared(x, experts_dense(experts, x, routing, self.activation,
                                                  self.dtype))
        else:
            y = self.combine(x, pair_outputs(experts, x, routing, self.activation, self.dtype,
                                             c.compute, c.grouped_matmul), routing)
        return y, self._aux(routing, token_mask)

    @staticmethod
    def _aux(routing: Routing, token_mask):
        return {"load_balance": load_balance_loss(routing, token_mask),
                "z_loss": router_z_loss(routing, token_mask),
                "expert_ids": routing.expert_ids, "weights": routing.weights,
                "probs": routing.probs}


def l2_normalize(x, axis, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def soft_moe_weights(x, mu, scale, token_mask=None):
    """Soft MoE dispatch and combine weights, both (G, M, E, P).

    logits = einsum('gmd,dnp->gmnp', l2norm(x), scale * l2norm(mu)); dispatch = softmax over the
    tokens M (each slot a convex mix of tokens); combine = softmax over all slots (E, P) (each
    token a convex mix of slot outputs). Masked tokens get no dispatch weight.
    """
    g, m, _ = x.shape
    _, e, p = mu.shape
    logits = jnp.einsum("gmd,dnp->gmnp", l2_normalize(x, -1),
                        scale.astype(jnp.float32) * l2_normalize(mu, 0))
    if token_mask is not None:
        logits_d = jnp.where(token_mask[:, :, None, None], logits, NEG_INF)
    else:
        logits_d = logits
    dispatch = jax.nn.softmax(logits_d, axis=1)
    combine = jax.nn.softmax(logits.reshape(g, m, e * p), axis=-1).reshape(g, m, e, p)
    return dispatch, combine


class SoftMoE(nn.Module):
    """Soft MoE (Puigcerver et al., ICLR'24) for non-causal blocks (vision tower, projector)."""

    cfg: MoEConfig
    activation: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dim: int | None = None

    @nn.compact
    def __call__(self, x, token_mask=None):
        c = self.cfg
        g, m, d = x.shape
        mu = sharding.param(self, "slots", nn.initializers.normal(d ** -0.5),
                            (d, c.num_experts, c.soft_slots), self.param_dtype,
                            ("embed", "experts", None))
        scale = sharding.param(self, "scale", nn.initializers.ones, (), self.param_dtype, ())
        params = ExpertParams(c.num_experts, c.expert_dim, self.activation, self.use_bias,
                              self.param_dtype, self.out_dim, name="experts")(d)
        zero = jnp.zeros((), jnp.float32)
        plan = None if self.is_initializing() else parallel.expert_parallel(c.num_experts)
        if plan is not None:                # slots travel to their experts' shards
            y = parallel.soft_moe(plan, x, token_mask, mu, scale, params, soft_moe_weights,
                                  self.activation, self.dtype)
            return y, {"load_balance": zero, "z_loss": zero}
        dispatch, combine = soft_moe_weights(x, mu, scale, token_mask)
        slots = jnp.einsum("gmnp,gmd->ngpd", dispatch.astype(self.dtype), x.astype(self.dtype))
        out = experts_all(params, slots.reshape(c.num_experts, g * c.soft_slots, d),
                          self.activation, self.dtype)
        out = out.reshape(c.num_experts, g, c.soft_slots, -1)
        y = jnp.einsum("gmnp,ngpd->gmd", combine.astype(self.dtype), out)
        return y, {"load_balance": zero, "z_loss": zero}


class CausalSoftMoE(nn.Module):
    """Causal soft variant for the decoder: per-token dense soft gating.

    y_t = sum_e softmax(x_t W)_e * expert_e(x_t). Every expert runs on every token, so the block
    is causal by construction and stateless (KV-cache decoding is unchanged).
    """

    cfg: MoEConfig
    activation: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dim: int | None = None

    @nn.compact
    def __call__(self, x, token_mask=None):
        c = self.cfg
        g, s, d = x.shape
        kernel = sharding.param(self, "router", nn.initializers.normal(0.02),
                                (d, c.num_experts), self.param_dtype, ("embed", None))
        logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), kernel.astype(jnp.float32))
        gates = jax.nn.softmax(logits, axis=-1)
        params = SoftGatedParams(c.num_experts, c.expert_dim, self.activation, self.use_bias,
                              self.param_dtype, self.out_dim, name="experts")(d)
        y = experts_soft_gated(params, x.reshape(g * s, d), gates.reshape(g * s, -1),
                               self.activation, self.dtype)
        valid = jnp.ones((g, s), bool) if token_mask is None else token_mask
        z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, -1)) * valid) / jnp.maximum(valid.sum(), 1)
        return y.reshape(g, s, -1), {"load_balance": jnp.zeros((), jnp.float32), "z_loss": z,
                                    "gates": gates}


def make_ffn(cfg: MoEConfig, layer: int, dense_dim: int, activation: str, use_bias: bool,
             dtype, param_dtype, *, causal: bool, name: str = "ffn",
             out_dim: int | None = None) -> nn.Module:
    """The feed-forward block of layer `layer`: dense, hard MoE, Soft MoE or causal soft."""
    kw = dict(activation=activation, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
              name=name, out_dim=out_dim)
    if not cfg.is_moe_layer(layer):
        return DenseFFN(dense_dim, **kw)
    if cfg.kind == "hard":
        return HardMoE(cfg, **kw)
    return CausalSoftMoE(cfg, **kw) if causal else SoftMoE(cfg, **kw)
