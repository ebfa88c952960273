"""Build, initialise and run a model from its config. Params are a plain pytree (`{'params': ...}`
is added only inside `apply`).

    cfg = get_config("tiny-hard"); model = build(cfg); params = init_params(cfg, seed=0)
    logits, cache, aux = forward(model, params, tokens, mask, images)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moex.config import EncDecConfig, VLMConfig, get_config
from moex.nn import sharding
from moex.nn.encdec import EncoderDecoder
from moex.nn.vlm import VLM


def build(cfg: VLMConfig | EncDecConfig | str) -> VLM | EncoderDecoder:
    """The flax module of a config: a VLM (or decoder-only LM), or an encoder-decoder."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    return EncoderDecoder(cfg) if isinstance(cfg, EncDecConfig) else VLM(cfg)


def _init_boxed(model: VLM, rng):
    """The params with flax's logical-partitioning metadata (moex.nn.sharding)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, jnp.ones_like(tokens))["params"]


def _init(model: VLM, rng):
    return sharding.unbox(_init_boxed(model, rng))


def init_params(cfg: VLMConfig | str, seed: int = 0):
    model = build(cfg)
    return jax.jit(functools.partial(_init, model))(jax.random.key(seed))


def abstract_params(cfg: VLMConfig | str):
    """Shapes and dtypes of every param (jax.ShapeDtypeStruct), without allocating any."""
    model = build(cfg)
    return jax.eval_shape(functools.partial(_init, model), jax.random.key(0))


def param_specs(cfg: VLMConfig | str):
    """The logical axis names of every param: a tree like the params, of PartitionSpecs whose
    entries are logical names (moex.nn.sharding), from shapes alone."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, build(cfg)), jax.random.key(0))
    return sharding.logical_specs(boxed)


def param_shardings(cfg: VLMConfig | str, plan: sharding.Plan):
    """NamedShardings of every param under `plan` (odd sizes replicate: Plan.spec)."""
    return sharding.shardings(plan, param_specs(cfg), abstract_params(cfg))


def shard_params(cfg: VLMConfig | str, params, plan: sharding.Plan | None):
    """Params placed on the plan's mesh (unchanged without a plan). From numpy or from arrays
    on any other mesh: this is also how a checkpoint moves onto another mesh."""
    if plan is None:
        return params
    return jax.device_put(params, param_shardings(cfg, plan))


def forward(model: VLM, params, tokens, token_mask, images=None, cache=None,
            last_only: bool = False):
    return model.apply({"params": params}, tokens, token_mask, images, cache, last_only)


def aux_loss(aux: dict, cfg: VLMConfig):
    """Weighted sum of the load-balance and z losses over all MoE blocks."""
    total = jnp.zeros((), jnp.float32)
    parts = [(a, cfg.decoder.moe) for a in aux["decoder"]]
    if cfg.vision is not None:
        parts += [(a, cfg.vision.moe) for a in aux["vision"]]
    for a, moe in parts:
        if a:
            total = total + moe.aux_loss_weight * a["load_balance"] + moe.z_loss_weight * a["z_loss"]
    return total
