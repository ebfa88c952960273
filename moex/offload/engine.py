"""Live offload engine: the decoder runs layer by layer; hard-MoE experts come from the slot pool.

Shape letters: B batch, T new tokens, D width, E experts.

For each MoE layer of a forward (prefill or decode step): a jitted piece runs attention and the
router; the engine reads which experts the layer's tokens picked (one device -> host sync), lets
the policy's `CacheCore` decide residency (misses loaded before the layer computes), syncs the
`SlotPool`, and a second jitted piece runs the experts through the expert->slot table. Dense
layers run whole. Every policy runs the same compiled pieces on the same weights, so logits are
bitwise identical across policies and budgets; `stream` records the visits for replay.

Scope today: text decoders with sequential blocks and GQA attention; demand policies
(all-resident, on-demand, lru, lfu). Prefetching policies and images come with the rest of the
offload issue.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import VLMConfig
from moex.nn.attention import Attention
from moex.nn.decoder import DecoderLayer, advance_cache, attention_inputs, init_cache
from moex.nn.experts import experts_ragged
from moex.nn.layers import MLP, Dense, make_norm
from moex.nn.routing import Router
from moex.offload.policies import Belady, CacheCore, make_policy
from moex.offload.store import ExpertStore, SlotPool


class OffloadEngine:
    def __init__(self, cfg: VLMConfig, params, policy: str, budget_bytes: int, device=None):
        d = cfg.decoder
        if d.parallel_block or d.attention != "gqa":
            raise ValueError(f"{cfg.name}: the offload engine runs sequential GQA blocks only")
        self.cfg = cfg
        self.store = ExpertStore.from_params(cfg, params, device)
        self.pool = SlotPool(self.store, budget_bytes, device)
        self.policy = make_policy(policy)
        if isinstance(self.policy, Belady):
            raise ValueError("belady needs the future trace: replay it with "
                             "moex.offload.simulator.simulate")
        self.core = CacheCore(self.policy, self.pool.num_slots, self.store.layers,
                              d.moe.num_experts)
        self.params = self.store.dense_params["decoder"]
        self.stream: list = []
        self.dtype = jnp.dtype(cfg.dtype)

    # -- compiled pieces --------------------------------------------------------------------------
    def _modules(self):
        d, dt, pdt = self.cfg.decoder, self.dtype, jnp.dtype(self.cfg.param_dtype)
        attn = Attention(d.num_heads, d.num_kv_heads, d.dim_per_head, d.rope_theta, d.rotary_pct,
                         d.qkv_bias, d.out_bias, dt, pdt, d.qk_norm, d.norm_eps,
                         d.rope_interleaved)
        norm = make_norm(d.norm, d.norm_eps, dt, pdt)
        m = d.moe
        router = Router(m.num_experts, m.top_k, m.renormalize, m.capacity_factor, pdt,
                        m.num_groups, m.topk_groups, m.routed_scaling)
        return attn, norm, router

    @functools.cached_property
    def _attend_route(self):
        attn, norm, router = self._modules()

        def run(p, x, mask, positions, valid, cache, index, from_zero):
            a, cache = attn.apply({"params": p["attn"]}, norm.apply({"params": p["attn_norm"]}, x),
                                  mask, positions, cache, index, from_zero)
            x = x + a
            h = norm.apply({"params": p["ffn_norm"]}, x)
            routing = router.apply({"params": p["ffn"]["router"]}, h, valid)
            return x, h, routing, cache
        return jax.jit(run, static_argnums=(7,))

    @functools.cached_property
    def _experts(self):
        d = self.cfg.decoder
        m = d.moe

        def run(p_ffn, pool, slot_of, x, h, routing):
            y = experts_ragged(pool, h, routing, d.activation, self.dtype, m.grouped_matmul,
                               slot_of)
            if m.num_shared_experts:
                shared = MLP(m.num_shared_experts * m.shared_dim, d.activation, d.mlp_bias,
                             self.dtype).apply({"params": p_ffn["shared_experts"]}, h)
                if m.shared_gate == "sigmoid":
                    gate = Dense(1, dtype=self.dtype).apply({"params": p_ffn["shared_gate"]}, h)
                    shared = jax.nn.sigmoid(gate) * shared
                y = y + shared
            return x + y.astype(self.dtype)
        return jax.jit(run)

    @functools.lru_cache(maxsize=None)
    def _dense_layer(self, i: int):
        layer = DecoderLayer(self.cfg.decoder, i, self.dtype, jnp.dtype(self.cfg.param_dtype))

        def run(p, x, mask, positions, valid, cache, index, from_zero):
            x, cache, _ = layer.apply({"params": p}, x, mask, positions, valid, cache, index,
                                      from_zero)
            return x, cache
        return jax.jit(run, static_argnums=(7,))

    @functools.cached_property
    def _head(self):
        d = self.cfg.decoder
        norm = make_norm(d.norm, d.norm_eps, self.dtype, jnp.dtype(self.cfg.param_dtype))

        def run(p, x):
            x = norm.apply({"params": p["final_norm"]}, x)
            if d.tie_embeddings:
                return jnp.einsum("btd,vd->btv", x, p["embed"].astype(self.dtype))
            return x @ p["lm_head"]["kernel"].astype(self.dtype)
        return jax.jit(run)

    # -- residency ----------------------------------------------------------------------------------
    def _make_resident(self, layer: int, needed: frozenset) -> None:
        t = len(self.stream)
        self.stream.append((layer, needed))
        self.core.visit(t, layer, needed)
        want = {k for part in self.core.resident.values() for k in part}
        for slot, owner in enumerate(self.pool.owner):
            if owner is not None and owner not in want:
                self.pool.owner[slot] = None
                del self.pool.slot_of[owner]
        free = [s for s, o in enumerate(self.pool.owner) if o is None]
        for key in sorted(want - set(self.pool.slot_of)):
            self.pool.load(key, free.pop(0))

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, tokens, token_mask, cache=None, fresh_cache: bool = False):
        """Logits (B, T, V) float32 and the new cache, like the model's forward."""
        p = self.params
        x = jnp.take(p["embed"], jnp.asarray(tokens), axis=0).astype(self.dtype)
        valid, positions, mask, index = attention_inputs(self.cfg.decoder, jnp.asarray(token_mask),
                                                         cache)
        from_zero = cache is None or fresh_cache
        caches = [None] * self.cfg.decoder.num_layers if cache is None else cache["layers"]
        new_layers = []
        for i, lc in enumerate(caches):
            pl = p[f"layer_{i}"]
            if i not in self.store.layers:
                x, lc = self._dense_layer(i)(pl, x, mask, positions, valid, lc, index, from_zero)
            else:
                x, h, routing, lc = self._attend_route(pl, x, mask, positions, valid, lc, index,
                                                       from_zero)
                chosen = np.asarray(routing.expert_ids)[np.asarray(routing.kept)]
                self._make_resident(i, frozenset(int(e) for e in chosen))
                x = self._experts(pl["ffn"], self.pool.arrays,
                                  jnp.asarray(self.pool.slot_table(i)), x, h, routing)
            new_layers.append(lc)
        logits = self._head(p, x).astype(jnp.float32)
        return logits, (None if cache is None else advance_cache(cache, valid, new_layers))

    def greedy(self, tokens, token_mask, max_new_tokens: int):
        """Greedy continuation (B, N) through prefill + decode steps over a KV cache."""
        tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
        b, t = tokens.shape
        cache = init_cache(self.cfg.decoder, b, t + max_new_tokens, self.dtype)
        logits, cache = self.forward(tokens, token_mask, cache, fresh_cache=True)
        out, all_logits = [], [logits[:, -1]]
        for _ in range(max_new_tokens):
            nxt = jnp.argmax(all_logits[-1], -1).astype(jnp.int32)
            out.append(np.asarray(nxt))
            if len(out) == max_new_tokens:
                break
            logits, cache = self.forward(nxt[:, None], np.ones((b, 1), np.int32), cache)
            all_logits.append(logits[:, -1])
        return np.stack(out, 1), np.stack([np.asarray(a) for a in all_logits], 1)
