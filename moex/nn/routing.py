"""Hard routing: the decision (which experts, with what weight, kept or dropped) as a value.

Shape letters: G groups (a group is one sequence or one image; capacity is per group), S tokens per
group, D model width, E experts, K experts chosen per token, C capacity (slots per expert per group).

Variants real checkpoints need, all from one `route` function:
  softmax -> top-k -> renormalise            Mixtral, OLMoE, Qwen3-MoE  (renormalize=True)
  softmax -> top-k, no renormalisation       Qwen1.5-MoE, DeepSeek-MoE  (renormalize=False)
  top-1 with capacity and token dropping     Switch (top_k=1, capacity_factor=1.25 or a fixed
                                             expert_capacity, renormalize=False)
  group-limited greedy, scaled weights       DeepSeek-V2 (num_groups, topk_groups, routed_scaling)

Capacity priority is k-major, then token order (GShard / Switch): every token's first choice is
placed before any second choice. Dropped pairs and padding tokens get `kept=False` and weight 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from moex.nn import sharding


@struct.dataclass
class Routing:
    logits: jax.Array       # (G, S, E) float32, router logits
    probs: jax.Array        # (G, S, E) float32, softmax over E
    expert_ids: jax.Array   # (G, S, K) int32
    weights: jax.Array      # (G, S, K) float32, combine weights; 0 where not kept
    kept: jax.Array         # (G, S, K) bool: token valid and within capacity
    position: jax.Array     # (G, S, K) int32: slot index within the expert's buffer of this group
    capacity: int = struct.field(pytree_node=False)  # C; S when dropless

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]


def expert_capacity(group_size: int, num_experts: int, top_k: int,
                    capacity_factor: float | None, fixed: int | None = None) -> int:
    """C = ceil(cf * S * K / E), at least 1; dropless (None) uses S, the most one expert can get.
    `fixed` (Switch checkpoints' `expert_capacity`): C = fixed per group whatever S is (capped at
    S, which keeps the same pairs)."""
    if fixed is not None:
        return max(1, min(group_size, fixed))
    if capacity_factor is None:
        return group_size
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * top_k / num_experts)))


def route(logits, *, top_k: int, renormalize: bool, capacity_factor: float | None = None,
          token_mask=None, num_groups: int = 1, topk_groups: int = 1,
          scaling: float = 1.0, capacity: int | None = None,
          padding_takes_capacity: bool = False) -> Routing:
    """logits (G, S, E) -> Routing. token_mask (G, S) bool marks real (non-padding) tokens.
    capacity: a fixed C per group instead of capacity_factor (Switch's `expert_capacity`);
    padding_takes_capacity: padding tokens take their place in the capacity order as real ones
    (transformers' Switch routes padding like any token) though they stay unkept."""
    g, s, e = logits.shape
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs
    if num_groups > 1 and topk_groups < num_groups:
        best = jnp.max(probs.reshape(g, s, num_groups, e // num_groups), axis=-1)
        _, groups = jax.lax.top_k(best, topk_groups)
        allowed = jnp.sum(jax.nn.one_hot(groups, num_groups, dtype=bool), axis=2) > 0
        scores = jnp.where(jnp.repeat(allowed, e // num_groups, axis=-1), probs, 0.0)
    top_p, ids = jax.lax.top_k(scores, top_k)
    if renormalize:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    if scaling != 1.0:
        top_p = top_p * scaling
    valid = jnp.ones((g, s), bool) if token_mask is None else token_mask.astype(bool)
    counted = jnp.ones_like(valid) if padding_takes_capacity else valid
    onehot = jax.nn.one_hot(ids, e, dtype=jnp.int32) * counted[:, :, None, None]  # (G, S, K, E)
    # k-major order: (G, K, S, E) flattened over (K, S), running count per expert.
    ordered = jnp.swapaxes(onehot, 1, 2).reshape(g, top_k * s, e)
    counts = jnp.cumsum(ordered, axis=1) - ordered                               # before this pair
    position = jnp.sum(counts * ordered, axis=-1).reshape(g, top_k, s).swapaxes(1, 2)
    capacity = expert_capacity(s, e, top_k, capacity_factor, capacity)
    kept = valid[:, :, None] & (position < capacity)
    weights = jnp.where(kept, top_p, 0.0)
    return Routing(logits=logits, probs=probs, expert_ids=ids.astype(jnp.int32), weights=weights,
                   kept=kept, position=position.astype(jnp.int32), capacity=capacity)


def route_tokens(x, kernel, token_mask=None, **settings) -> Routing:
    """x (G, S, D) through the router kernel (D, E) in float32, then `route` with `settings`."""
    logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), kernel.astype(jnp.float32))
    return route(logits, token_mask=token_mask, **settings)


def jittered(x, rng, amount: float):
    """Switch's router jitter: x (in float32) times uniform noise in [1 - a, 1 + a], for
    training (the router then sees x * noise; the experts see x)."""
    x = x.astype(jnp.float32)
    return x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - amount, 1.0 + amount)



class Router(nn.Module):
    """Linear router x (G, S, D) @ kernel (D, E) -> Routing."""

    num_experts: int
    top_k: int
    renormalize: bool = True
    capacity_factor: float | None = None
    param_dtype: jnp.dtype = jnp.float32
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    capacity: int | None = None
    padding_takes_capacity: bool = False
    jitter: float = 0.0              # Switch: multiplicative noise on the router's input, applied
                                     # only when the caller passes a "jitter" rng (training)

    @nn.compact
    def __call__(self, x, token_mask=None) -> Routing:
        kernel = sharding.param(self, "kernel", nn.initializers.normal(0.02),
                                (x.shape[-1], self.num_experts), self.param_dtype,
                                ("embed", None))
        if self.jitter > 0 and self.has_rng("jitter"):
            x = jittered(x, self.make_rng("jitter"), self.jitter)
        return self.route_fn()(x, kernel, token_mask)

    def route_fn(self):
        """`route_tokens` with this router's settings: (x, kernel, token_mask) -> Routing."""
        return functools.partial(route_tokens, top_k=self.top_k, renormalize=self.renormalize,
                                 capacity_factor=self.capacity_factor,
                                 num_groups=self.num_groups, topk_groups=self.topk_groups,
                                 scaling=self.scaling, capacity=self.capacity,
                                 padding_takes_capacity=self.padding_takes_capacity)


# --- auxiliary losses: pure functions, returned as values -----------------------------------------

def load_balance_loss(routing: Routing, token_mask=None):
    """Switch load-balance loss E * sum_e f_e * P_e over the valid tokens.

    f_e: assignments to expert e (all K choices, before capacity) per token; P_e: mean router
    probability of e. Equals 1 * K for perfectly uniform routing (K=1: the Switch loss, min 1).
    Matches transformers' `load_balancing_loss_func` for Mixtral-style top-k.
    """
    g, s, e = routing.probs.shape
    valid = jnp.ones((g, s), bool) if token_mask is None else token_mask.astype(bool)
    n = jnp.maximum(jnp.sum(valid), 1)
    assign = jnp.sum(jax.nn.one_hot(routing.expert_ids, e), axis=2)            # (G, S, E)
    f = jnp.sum(assign * valid[..., None], axis=(0, 1)) / n
    p = jnp.sum(routing.probs * valid[..., None], axis=(0, 1)) / n
    return e * jnp.sum(f * p)


def router_z_loss(routing: Routing, token_mask=None):
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2."""
    g, s, _ = routing.logits.shape
    valid = jnp.ones((g, s), bool) if token_mask is None else token_mask.astype(bool)
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    return jnp.sum(jnp.square(z) * valid) / jnp.maximum(jnp.sum(valid), 1)
