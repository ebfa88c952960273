"""Live offload engine: the decoder runs layer by layer; hard-MoE experts come from the slot pool.

Shape letters: B batch, T new tokens, D width, K choices per token, E experts, L_moe MoE layers.

The expert -> slot table lives on the device (`SlotPool.device_table`, written by the same
jitted update that writes the slots), and every expert piece gathers its experts from the pool
through it, so a layer whose experts are resident needs no host decision before it runs.

A forward (prefill or decode step) takes one of two paths:

  fused      when the pool holds every expert (all-resident, or a budget that holds a whole
             forward) and nothing reads a layer's state before it runs: the whole forward is
             one jitted call (`LayerPieces.step`), as in `moex.generate.Generator`. Then the
             host reads every layer's routing in one transfer and checks it, layer by layer,
             against the residency the call saw; at the first layer that read an unresident
             expert the engine loads it and recomputes from that layer on, layer by layer.
             When every expert is resident nothing can miss, and generate's decode steps
             leave those visits (cache core, trace rows) to be entered while the next step's
             call computes (`forward`'s defer; `flush`).
  per layer  otherwise. Embeddings first (with images: the vision tower + projector, spliced
             at the placeholders); a `predictive` policy's admission before the first MoE
             layer (the forecaster's (L_moe, E) forecast, which a routing-path predictor may
             compute from that layer's input states, and its prefetches, async `device_put`).
             Each MoE layer is one dispatch (`LayerPieces.layer`): attention, router, the
             pre-gate (the next MoE layer's router on this hidden state), lookahead heads if
             any, and the experts *optimistically* from the pool as the table stands. The host
             then reads the routing (one transfer), and the `CacheCore` turns the visit into
             rounds of demand loads (misses first) and prefetches. When the layer read an
             unresident expert, each round's loads are issued and the missing experts fill
             their pairs of the layer's accumulator (`LayerPieces.experts`) and the layer's
             output is combined again: a recompute, counted (`stats.recomputed_layers`). An
             expert piece has a fixed cost, which a recompute pays twice, so by default
             (`dispatch='adaptive'`) a layer whose previous visit of the same length missed
             *waits*: its piece stops before the experts, and they are computed once, after
             the loads (`stats.waited_layers`). The prefetches then overlap the next layer.
             With a miss rule (`moex.offload.misses`) a missed expert may instead load its
             low-precision copy (upgraded in the background, with the prefetches) or run on
             the host CPU device on the rows that picked it (its pairs computed from the
             store's weights and merged into the accumulator).

Exactness: expert outputs are kept per token-expert pair and combined once by the same
function (`LayerPieces._experts_fn`) on every path -- optimistic, recomputed, waited, in rounds,
fused -- and a pair's value does not depend on which other experts were active, so all policies,
budgets and paths give bitwise the same logits (the tests hold the fused and per-layer paths
equal). Every piece runs the model's own moex.nn modules on the model's params; the experts'
pairs take the config's `compute` route, whose 'auto' on a pool gathers or sorts.

`stream` records the visits (with their hints) for exact replay, `trace()` the routing in the
trace format, `stats` the recomputes and where the time went (`profile=True` for a per-layer
breakdown). Text decoders with sequential blocks and GQA attention (the offloaded layers);
`belady` needs the future and runs in the replay simulator only.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import VLMConfig, require_decoder_lm
from moex.generate import (GREEDY, GenerationResult, Sampling, check_inputs, result, sample,
                           stop_ids)
from moex.model import build
from moex.nn.decoder import DecoderLayer, advance_cache, attention_inputs, init_cache
from moex.nn.experts import PAIR_COMPUTE, pair_outputs
from moex.nn.vlm import VLM
from moex.nn.routing import route
from moex.offload.cache import CacheCore, Visit
from moex.offload import quant
from moex.offload.misses import MissCosts
from moex.offload.policies import make_policy
from moex.offload.store import ExpertStore, SlotPool, moe_layers
from moex.offload.trace import TraceRecorder


@dataclasses.dataclass
class EngineStats:
    """Time and bytes of the engine's copies (counts are in `core.stats`), its recomputes and
    where the host's time went."""
    stall_s: float = 0.0                     # the host waiting for copies before a round
                                             # computes (the encoder-decoder engine; the decoder
                                             # engine never waits on the host: a piece that
                                             # reads an in-flight copy waits on the device)
    copy_s_per_expert: float = 0.0           # calibrated host -> device copy of one expert
    stall_per_layer: dict = dataclasses.field(default_factory=dict)
    recomputed_layers: int = 0               # layer visits that read an unresident expert
    recomputed_pieces: int = 0               # expert pieces run again for them
    recomputed_per_layer: dict = dataclasses.field(default_factory=dict)
    waited_layers: int = 0                   # layer visits dispatched without their experts
                                             # (`dispatch`), computed once after the loads
    fused: int = 0                           # forwards run as one call
    time_s: dict = dataclasses.field(default_factory=dict)   # seconds per activity (`_lap`)
    layer_s: dict = dataclasses.field(default_factory=dict)  # layer -> activity -> seconds


@dataclasses.dataclass
class _Pass:
    """One forward: its inputs, `LayerPieces.prepare`'s outputs and what it gathers for the
    trace."""
    tokens: np.ndarray
    token_mask: np.ndarray
    from_zero: bool
    forward: int                       # the engine's count of forwards before this one
    request_ids: np.ndarray            # (B,) row labels in the trace
    mask: object = None
    positions: object = None           # RoPE positions (multimodal or counted)
    valid: object = None
    index: object = None
    inject: tuple = ()
    counted: object = None
    rope: object = None                # multimodal positions or None
    deferred: bool = False             # its visits and trace rows wait in `_pending`
    forecast: np.ndarray | None = None
    routed: dict = dataclasses.field(default_factory=dict)
    pregates: dict = dataclasses.field(default_factory=dict)
    hidden: dict = dataclasses.field(default_factory=lambda: {"hidden": {}, "hidden_pre": {}})


DISPATCH = ("adaptive", "optimistic", "wait")


def pair_compute(compute: str) -> str:
    """The route the engine computes a MoE layer's pairs by: the config's, except that the
    one-hot reference 'dense' (no per-pair outputs to fill in rounds) runs as 'auto'."""
    return compute if compute in PAIR_COMPUTE else "auto"


def _attend_route(layer: DecoderLayer, x, mask, positions, valid, cache, index, from_zero):
    """A MoE layer up to its experts: (x after attention, FFN input h, routing of h, cache)."""
    x, cache = layer.attend(x, mask, positions, cache, index, from_zero)
    h = layer.ffn_input(x)
    return x, h, layer.ffn.route(h, valid), cache


def _pregate(layer: DecoderLayer, x, valid):
    """The layer's router on another layer's hidden state x (B, T, D): expert ids (B, T, K)."""
    return layer.ffn.route(layer.ffn_input(x), valid).expert_ids


def _combine(layer: DecoderLayer, h, pairs, routing):
    return layer.ffn.combine(h, pairs, routing)


def _head(model: VLM, x):
    return model.decoder.head(x)


class LayerPieces:
    """The engine's compiled pieces for one config. Each runs methods of the model's own moex.nn
    modules on the model's params (the engine's tree lacks only the routed experts), so a layer
    is defined in one place; the engine adds only where the expert weights come from (the slot
    pool, through the expert->slot table) and in which rounds.

      prepare       tokens (and images) -> decoder inputs, positions,   VLM.inputs,
                    attention mask and cache index                      attention_inputs
      dense_layer   a layer without a hard MoE, whole                   DecoderLayer
      layer         a MoE layer in one dispatch: attention with its     DecoderLayer.attend,
                    residual, the FFN norm, the router, the pre-gate    DecoderLayer.ffn_input,
                    (the next MoE layer's router on this hidden state)  HardMoE.route,
                    and the experts optimistically from the pool        (experts, below)
      experts       the active experts' pair outputs from the pool      pair_outputs,
                    through the device table, into the layer's          HardMoE.combine
                    accumulator; weighted sum over K, shared experts,
                    residual (the recompute of a missed layer)
      head          final norm and LM head                              Decoder.head
      step          a whole forward in one call (the fused path)        all of the above
      merge         host-computed pairs into the accumulator

    `pieces_for(cfg)` caches one instance per config, shared by every engine of that config, so
    policies and budgets never recompile.
    """

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.model = build(cfg)

    def _layer(self, i: int) -> DecoderLayer:
        return DecoderLayer(self.cfg.decoder, i, self.dtype, jnp.dtype(self.cfg.param_dtype))

    @functools.cached_property
    def _moe_layer(self) -> DecoderLayer:
        """Every hard-MoE layer is the same module (its index only picks the FFN kind), so this
        one, and one compilation of each piece, serves them all."""
        return self._layer(moe_layers(self.cfg)[0])

    def _attend_route_pregate(self, p, p_next, x, mask, positions, valid, cache, index,
                              from_zero):
        layer = self._moe_layer
        x, h, routing, cache = layer.apply({"params": p}, x, mask, positions, valid, cache,
                                           index, from_zero, method=_attend_route)
        pregate = None
        if p_next is not None:
            pregate = layer.apply({"params": p_next}, x, valid, method=_pregate)
        return x, h, routing, pregate, cache

    def _pool_pairs(self, fmt=None, dtype: str | None = None):
        """(pool, slot_of (E,), active (E,), h, routing) -> the active experts' pair outputs
        (B*T, K, D), their weights read from the pool through the expert->slot table
        (unresident experts must be inactive). fmt: the pool holds quantized copies (fmt, and
        the dtype they dequantize to): the layer's E slots are dequantized as the slot update
        would, then computed through an identity table -- the same route and values as
        dequantized slots, so the numbers are bitwise the same."""
        d = self.cfg.decoder
        how = pair_compute(d.moe.compute)

        def plain(pool, slot_of, active, h, routing):
            return pair_outputs(pool, h, routing, d.activation, self.dtype, how,
                                d.moe.grouped_matmul, slot_of, active)

        def quantized(pool, slot_of, active, h, routing):
            stored = {w: a[jnp.maximum(slot_of, 0)] for w, a in pool.items()}
            weights = jax.vmap(lambda e: quant.dequantize_expert(e, fmt, jnp.dtype(dtype)))(
                stored)
            return pair_outputs(weights, h, routing, d.activation, self.dtype, how,
                                d.moe.grouped_matmul,
                                jnp.arange(slot_of.shape[0], dtype=jnp.int32), active)
        return plain if fmt is None else quantized

    def _experts_fn(self, fmt=None, dtype: str | None = None):
        """The expert half of a MoE layer: (p, pool, table, row, active, acc, x, h, routing) ->
        (x + the layer's FFN output, acc). The experts in `active` that the table holds
        (`table[row] >= 0`) fill their pairs of acc (B*T, K, D); the layer's output is then
        combined from acc. One function for every path (optimistic, rounds, recompute, fused),
        so a pair's value never depends on which path filled it and the combine is the same
        compiled code: the outputs are bitwise equal whenever acc holds every needed pair."""
        layer, pairs_of = self._moe_layer, self._pool_pairs(fmt, dtype)

        def run(p, pool, table, row, active, acc, x, h, routing):
            slot_of = table[row]
            active = active & (slot_of >= 0)
            pairs = pairs_of(pool, slot_of, active, h, routing)
            mine = active[routing.expert_ids.reshape(acc.shape[:2])]
            acc = jnp.where(mine[..., None], pairs, acc)
            return x + layer.apply({"params": p}, h, acc, routing, method=_combine), acc
        return run

    @functools.lru_cache(maxsize=None)
    def experts(self, fmt=None, dtype: str | None = None):
        """`_experts_fn` jitted (fmt: quantized slots)."""
        return jax.jit(self._experts_fn(fmt, dtype))

    @functools.lru_cache(maxsize=None)
    def layer(self, fmt=None, dtype: str | None = None, heads=None, optimistic: bool = True):
        """A MoE layer in one dispatch, its experts optimistic: (head params, head index, p,
        p_next, pool, table, row, x, mask, positions, valid, cache, index, from_zero) -> (x
        after the layer as the table's experts give it, acc, x after attention, h, routing,
        routing (3, B, T, K) int32: expert ids, kept, pre-gate ids (-1: none), cache, lookahead
        probabilities or None). heads: lookahead heads, `heads(head_params, x, index)` mapping
        the post-attention state x (B, T, D) of MoE layer `index` to per-token probabilities
        (B, T, O, E) (`moex.predict.lookahead.layer_fn`), computed in the same piece so they
        come back with the routing. optimistic False: the piece stops before the experts (x
        after the layer is x after attention, acc is zeros) -- a layer that waits for its
        routing and loads, then computes its experts once (`experts`)."""
        experts = self._experts_fn(fmt, dtype)
        k, e = self.cfg.decoder.moe.top_k, self.cfg.decoder.moe.num_experts

        def run(head_params, head_index, p, p_next, pool, table, row, x, mask, positions, valid,
                cache, index, from_zero):
            x_mid, h, routing, pregate, cache = self._attend_route_pregate(
                p, p_next, x, mask, positions, valid, cache, index, from_zero)
            acc = jnp.zeros((h.shape[0] * h.shape[1], k, pool["w_down"].shape[-1]), self.dtype)
            x_out = x_mid
            if optimistic:
                x_out, acc = experts(p, pool, table, row, jnp.ones((e,), bool), acc, x_mid, h,
                                     routing)
            routes = _routes(routing, pregate)
            ahead = None if heads is None else heads(head_params, x_mid, head_index)
            return x_out, acc, x_mid, h, routing, routes, cache, ahead
        return jax.jit(run, static_argnums=(13,))

    @functools.cached_property
    def host_pairs(self):
        """The pairs of the `active` experts computed from stacked (E, ...) weights where they
        live (the host CPU device): the same pair_outputs, without a slot table."""
        d = self.cfg.decoder

        def run(weights, active, h, routing):
            return pair_outputs(weights, h, routing, d.activation, self.dtype,
                                pair_compute(d.moe.compute), d.moe.grouped_matmul, None, active)
        return jax.jit(run)

    @functools.cached_property
    def merge(self):
        def run(acc, pairs, active, ids):
            mine = active[ids.reshape(acc.shape[:2])]
            return jnp.where(mine[..., None], pairs, acc)
        return jax.jit(run, donate_argnums=(0,))

    def _dense_fn(self, i: int):
        layer = self._layer(i)

        def run(p, x, mask, positions, valid, cache, index, from_zero):
            x, cache, _ = layer.apply({"params": p}, x, mask, positions, valid, cache, index,
                                      from_zero)
            return x, cache
        return run

    @functools.lru_cache(maxsize=None)
    def dense_layer(self, i: int):
        return jax.jit(self._dense_fn(i), static_argnums=(7,))

    def _prepare(self, params, tokens, token_mask, images, cache):
        """Everything a forward needs before its first layer: (x, RoPE positions (multimodal
        or counted), DeepStack injections, valid, counted positions, attention mask, cache
        index) -- VLM.inputs and attention_inputs; `cache` without its layers (or None)."""
        x, rope, inject = self.model.apply({"params": params}, tokens, images, token_mask,
                                           None if cache is None else cache["pos"],
                                           method=VLM.inputs)[:3]
        valid, counted, mask, index = attention_inputs(self.cfg.decoder, token_mask, cache)
        return x, (counted if rope is None else rope), inject, valid, counted, mask, index, \
            rope

    @functools.cached_property
    def prepare(self):
        return jax.jit(self._prepare)

    @functools.cached_property
    def advance(self):
        """advance_cache, jitted (the layers pass through untouched)."""
        return jax.jit(advance_cache)

    def _head_fn(self, params, x):
        return self.model.apply({"params": params}, x, method=_head)

    @functools.cached_property
    def head(self):
        return jax.jit(self._head_fn)

    @functools.lru_cache(maxsize=None)
    def step(self, fmt=None, dtype: str | None = None):
        """A whole forward as one jitted call, every MoE layer's experts read from the pool
        through the device table (the engine's fused path): (params, pool, table, tokens,
        token_mask, images, cache without its layers (or None), layer caches, from_zero,
        last_only) -> (logits, new layer caches, the cache's next index / valid / pos (or None),
        routing (L_moe, 3, B, T, K) int32: expert ids, kept, pre-gate ids (-1: none), router
        probabilities (L_moe, B, T, E), each MoE layer's input x (L_moe, B, T, D) (to recompute
        from), the counted positions (B, T)). Few outputs, as each costs the dispatch time. It
        runs the very functions of the per-layer pieces (`_prepare`, `_dense_fn`,
        `_attend_route_pregate`, `_experts_fn`, `_head_fn`); tests hold the two paths bitwise
        equal."""
        layers, experts = moe_layers(self.cfg), self._experts_fn(fmt, dtype)
        k, e = self.cfg.decoder.moe.top_k, self.cfg.decoder.moe.num_experts

        def run(params, pool, table, tokens, token_mask, images, meta, caches, from_zero,
                last_only):
            prep = self._prepare(params, tokens, token_mask, images, meta)
            x, positions, inject, valid, _, mask, index, rope = prep
            p = params["decoder"]
            new, inputs, routes, probs = [], [], [], []
            every = jnp.ones((e,), bool)
            for i, lc in enumerate(caches):
                if i not in layers:
                    x, lc = self._dense_fn(i)(p[f"layer_{i}"], x, mask, positions, valid, lc,
                                              index, from_zero)
                else:
                    li = layers.index(i)
                    p_next = p[f"layer_{layers[li + 1]}"] if li + 1 < len(layers) else None
                    inputs.append(x)
                    x_mid, h, routing, pregate, lc = self._attend_route_pregate(
                        p[f"layer_{i}"], p_next, x, mask, positions, valid, lc, index,
                        from_zero)
                    acc = jnp.zeros((h.shape[0] * h.shape[1], k, pool["w_down"].shape[-1]),
                                    self.dtype)
                    x, acc = experts(p[f"layer_{i}"], pool, table, li, every, acc, x_mid, h,
                                     routing)
                    routes.append(_routes(routing, pregate))
                    probs.append(routing.probs)
                x = x + inject[i] if i < len(inject) else x
                new.append(lc)
            logits = self._head_fn(params, x[:, -1:] if last_only else x)
            nxt = None if meta is None else advance_cache(meta, valid, (), rope)
            return logits, new, nxt, jnp.stack(routes), jnp.stack(probs), jnp.stack(inputs), \
                prep[4]
        return jax.jit(run, static_argnums=(8, 9), donate_argnums=(7,))


def _routes(routing, pregate):
    """(3, B, T, K) int32: a layer's expert ids, kept pairs and pre-gate ids (-1: none), one
    array so the host reads them in one transfer."""
    pre = jnp.full_like(routing.expert_ids, -1) if pregate is None else pregate
    return jnp.stack([routing.expert_ids, routing.kept.astype(jnp.int32), pre])


@functools.lru_cache(maxsize=8)
def pieces_for(cfg: VLMConfig) -> LayerPieces:
    return LayerPieces(cfg)


class OffloadEngine:
    def __init__(self, cfg: VLMConfig, params, policy: str, budget_bytes: int, device=None,
                 forecaster=None, rounds: bool = True, store: ExpertStore | None = None,
                 lookahead=None, record_hidden: bool = False, misses=None, host_device=None,
                 quantized_slots: bool = False, warm: bool = False, fuse: bool = True,
                 profile: bool = False, dispatch: str = "adaptive"):
        """params: the model's params (experts are moved to host memory), or None with `store`
        (an ExpertStore built once and shared by several engines). lookahead: trained heads
        (`moex.predict.lookahead.LookaheadHints`) for the lookahead policy and for predictive's
        combined form. record_hidden: the trace also records each MoE layer's hidden states
        (trace fields `hidden`, `hidden_pre`: what the heads train on). warm: start with every
        expert in the pool (`preload`; the budget must hold them all), as the model runs
        without offloading; otherwise the pool starts empty. fuse: run a forward as one call
        where it can (`_fusable`); False keeps every forward layer by layer (to measure what
        fusing buys). profile: wait for the device after each piece, so `stats.time_s` and
        `stats.layer_s` say where the time goes (slower; see `_lap`). dispatch: how a MoE layer
        of the per-layer path runs (one of DISPATCH) -- 'optimistic' computes its experts from
        the pool as it stands and recomputes the missing ones after their loads; 'wait' reads
        the routing first and computes the experts once, after the loads; 'adaptive' (the
        default) waits at a layer whose previous visit of the same length (a decode step's
        after a decode step's) read an unresident expert, else is optimistic (an expert piece
        has a fixed cost, which a recompute pays twice)."""
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, found {dispatch!r}")
        d = require_decoder_lm(cfg, "OffloadEngine (moex.offload.seq2seq_engine runs "
                                    "encoder-decoders)").decoder
        if d.parallel_block or d.attention != "gqa":
            raise ValueError(f"{cfg.name}: the offload engine runs sequential GQA blocks only")
        self.cfg = cfg
        for hint in (forecaster, lookahead):
            if hint is not None:
                hint.check_model(cfg)
        self.store = store if store is not None else ExpertStore.from_params(cfg, params, device)
        self.pool = SlotPool(self.store, budget_bytes, device, quantized_slots)
        self.policy = make_policy(policy, lookahead is not None)
        if self.policy.uses_lookahead and lookahead is None:
            raise ValueError(f"{policy} needs lookahead heads (moex.predict.lookahead)")
        self.lookahead, self.record_hidden = lookahead, record_hidden
        if self.policy.needs_future:
            raise ValueError(f"{policy} needs the future trace: replay it with "
                             "moex.offload.simulator.simulate")
        if self.policy.uses_forecast and forecaster is None:
            raise ValueError(f"{policy} needs a forecaster (moex.offload.forecast)")
        self.forecaster = forecaster
        self.misses = misses
        if misses is not None and misses.spec.low is not None and \
                self.store.low_fmt != misses.spec.low:
            raise ValueError(f"misses {misses.spec}: the store's low-precision copy is "
                             f"{self.store.low_fmt or 'absent'}; build it with "
                             f"low_dtype='{misses.spec.low}'")
        self.host_device = host_device or host_device_for(self.pool.device)
        self.core = CacheCore(self.policy, self.pool.num_slots, self.store.layers,
                              d.moe.num_experts, rounds, misses)
        self.params = self.store.dense_params
        self.stream: list[Visit] = []
        self.recorder = TraceRecorder(cfg)
        self.stats = EngineStats()
        self.timings: dict = {}                   # of the last generate()
        self.dtype = jnp.dtype(cfg.dtype)
        self._inflight: dict = {}                 # key -> staged device arrays of its copy
        self.pieces = pieces_for(cfg)
        fmt = (self.store.fmt, str(self.store.dtype)) if self.pool.quantized else ()
        self._experts = self.pieces.experts(*fmt)              # chosen once
        heads = None if lookahead is None else lookahead.layer_fn
        self._layer = self.pieces.layer(*(fmt or (None, None)), heads)
        self._layer_waiting = self.pieces.layer(*(fmt or (None, None)), heads, False)
        self.dispatch = dispatch
        self._missed: dict = {}                  # (MoE layer, tokens per row) -> its last
                                                 # such visit read an unresident expert
        self._step = self.pieces.step(*fmt)
        e = d.moe.num_experts
        self._rows = [jax.device_put(jnp.int32(i), self.pool.sharding)
                      for i in range(len(self.store.layers))]
        self._none = np.zeros(e, bool)           # no expert active: combine only
        self.fuse, self.profile = fuse, profile
        self._last = time.perf_counter()          # the lap clock (`_lap`)
        self._forward = 0
        self._pending: list = []                 # deferred forwards' visits (`forward`)
        if warm:
            self.preload()

    def preload(self) -> None:
        """Put every expert in the pool before the first request: the model as it runs
        without offloading. Setup, not traffic: the copies count as neither loads nor cache
        accesses. The budget must hold every expert."""
        keys = [(layer, e) for layer in self.store.layers for e in range(self.store.num_experts)]
        if self.pool.num_slots < len(keys):
            raise ValueError(f"preloading needs {len(keys)} expert slots (every expert), the "
                             f"budget gives {self.pool.num_slots}")
        for key in keys:
            if not self.pool.is_resident(key):
                self.pool.load(key, count=False)
                self.core.place(key)
        jax.block_until_ready(self.pool.arrays)

    # -- copies -----------------------------------------------------------------------------------
    def _free(self, key) -> None:
        self.pool.free(key)
        self._inflight.pop(key, None)

    def _execute(self, loads) -> None:
        """Issue loads (async), together: evictions free slots, then each key is copied into a
        free slot (its low-precision copy for kind "low"; an upgrade rewrites the key's own
        slot)."""
        if not loads:
            return
        for load in loads:
            if load.victim is not None:
                self._free(load.victim)
        requests = [(load.key, self.pool.slot_of(load.key) if load.kind == "upgrade" else None,
                     load.kind == "low") for load in loads]
        for load, staged in zip(loads, self.pool.load_many(requests)):
            self._inflight[load.key] = staged

    def _wait(self, layer: int, experts) -> None:
        staged = [self._inflight.pop((layer, e)) for e in sorted(experts)
                  if (layer, e) in self._inflight]
        if staged:
            start = time.perf_counter()
            jax.block_until_ready(staged)
            waited = time.perf_counter() - start
            self.stats.stall_s += waited
            self.stats.stall_per_layer[layer] = self.stats.stall_per_layer.get(layer, 0) + waited

    def calibrate_copy(self, repeats: int = 5, low: bool = False) -> float:
        """Median seconds of one expert's host -> device copy (device_put + ready) of its
        stored copy (or its low-precision copy)."""
        arrays = self.store.copy_of(next(iter(self.store.host)), low)[0]
        seconds = _median_seconds(lambda: jax.device_put(arrays, self.pool.sharding), repeats)
        if not low:
            self.stats.copy_s_per_expert = seconds
        return seconds

    def miss_costs(self, repeats: int = 5, rows: int = 16) -> MissCosts:
        """The miss cost model measured here: the link from the stored (and low-precision)
        copy times -- latency and bandwidth from the two sizes, bandwidth alone from one -- and
        the host from one expert's pairs on the host device at 1 and `rows` rows."""
        store = self.store
        t_full = self.calibrate_copy(repeats)
        latency, bandwidth = 0.0, store.stored_bytes / t_full
        if store.low is not None:
            t_low = self.calibrate_copy(repeats, low=True)
            if t_full > t_low and store.stored_bytes > store.low_bytes:
                bandwidth = (store.stored_bytes - store.low_bytes) / (t_full - t_low)
                latency = max(0.0, t_full - store.stored_bytes / bandwidth)
        layer = store.layers[0]
        weights = store.host_weights(layer, self.host_device)
        active = jax.device_put(np.eye(store.num_experts, dtype=bool)[0], self.host_device)
        times = []
        for n in (1, rows):
            h, routing = _probe_rows(self.cfg, n, self.host_device)
            times.append(_median_seconds(
                lambda: self.pieces.host_pairs(weights, active, h, routing), repeats))
        per_row = max(0.0, (times[1] - times[0]) / (rows - 1))
        return MissCosts(bandwidth, latency, per_row, max(0.0, times[0] - per_row),
                         store.stored_bytes, store.low_bytes)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, tokens, token_mask, cache=None, fresh_cache: bool = False, images=None,
                last_only: bool = False, request_ids=None, defer: bool = False):
        """Logits (B, T, V) float32 (T = 1 with last_only) and the new cache, like the model's
        forward. request_ids (B,) label the rows in the trace (default 0..B-1). defer: a fused
        forward on a pool that holds every expert (nothing can miss, nothing is loaded) leaves
        its visits and trace rows to be entered while the next forward's call computes, or by
        `flush()` (generate's decode steps defer; `stream`, `core` and the trace are complete
        once generate returns)."""
        tokens, token_mask = np.asarray(tokens, np.int32), np.asarray(token_mask, np.int32)
        b, t = tokens.shape
        self._last = time.perf_counter()                  # laps start (see _lap)
        meta = None if cache is None else {k: cache[k] for k in ("index", "valid", "pos")}
        caches = [None] * self.cfg.decoder.num_layers if cache is None else list(cache["layers"])
        # host inputs travel with the first piece's call (a separate device_put waits behind
        # the device's queue); they land on the pool's device, where the params are
        args = (tokens, token_mask, images)
        from_zero = cache is None or fresh_cache
        run = _Pass(tokens, token_mask, from_zero, self._forward,
                    np.arange(b) if request_ids is None else np.asarray(request_ids))
        self._forward += 1
        if self._fusable(t):
            x, start, logits, nxt = self._fused(run, args, meta, caches, last_only, defer)
        else:
            self.flush()
            # x with image tokens spliced in; with Qwen3-VL images also multimodal RoPE
            # positions and the DeepStack injections added after layers 0, 1, ... (moex.nn.vlm)
            x, run.positions, run.inject, run.valid, run.counted, run.mask, run.index, \
                run.rope = self.pieces.prepare(self.params, *args, meta)
            start, logits, nxt = 0, None, None
            self._lap("prepare", wait=x)
        if start < len(caches):
            x = self._layers(run, start, x, caches)
        if logits is None:
            logits = self.pieces.head(self.params, x[:, -1:] if last_only else x)
            self._lap("head", wait=logits)
        if cache is not None and nxt is None:
            nxt = self.pieces.advance(meta, run.valid, (), run.rope)
        if not run.deferred:
            self._enter(run)
        return logits, (None if cache is None else {**nxt, "layers": tuple(caches)})

    def flush(self) -> None:
        """Enter the deferred forwards' visits and trace rows (see `forward`'s defer)."""
        pending, self._pending = self._pending, []
        for job in pending:
            job()

    # -- the two paths of a forward -------------------------------------------------------------
    def _fusable(self, t: int) -> bool:
        """A forward runs as one jitted call (`LayerPieces.step`) when the pool can hold every
        expert at once and nothing reads a layer's state before the layer runs (a forecaster's
        admission, lookahead heads, recorded hidden states, a policy that keeps nothing), for a
        decode step or once every expert is resident; a miss then recomputes from its layer
        on. Otherwise layer by layer, each optimistically (`_layers`)."""
        every = len(self.store.host)                       # experts in the store
        return (self.fuse and self.pool.num_slots >= every
                and not (self.policy.uses_forecast or self.policy.keeps_nothing)
                and self.lookahead is None and not self.record_hidden
                and (t == 1 or len(self.pool.resident()) == every))

    def _fused(self, run: "_Pass", args, meta, caches, last_only: bool, defer: bool):
        """The forward as one call; then each MoE layer's visit in order, checked against the
        table the call read. Returns (x, the layer to go on from, logits, the cache's next
        index / valid / pos); `caches` is updated in place. At the first MoE layer that read an
        unresident expert, the visits so far stand, the layer's loads run and (its input x,
        the layer, None, None) come back for `_layers` to run it and the rest again -- the
        call's caches hold this step's keys and values from a wrong x there, which each layer
        overwrites in place before reading them. A recomputed layer runs the same functions,
        so the numbers are those of a run without the miss. With every expert resident no
        layer can miss: `defer` then leaves the visits for later (`forward`)."""
        resident = self.pool.resident()
        logits, caches[:], nxt, routes, probs, inputs, run.counted = self._step(
            self.params, self.pool.arrays, self.pool.device_table(), *args, meta, caches,
            run.from_zero, last_only)
        self.stats.fused += 1
        loads = self.pool.loads
        self.flush()                      # earlier forwards' visits, while this call computes
        if self.pool.loads != loads:
            raise AssertionError("a deferred forward's visits loaded experts")
        self._lap("fused step", wait=logits)
        if defer and len(resident) == len(self.store.host):        # nothing can have missed
            run.deferred = True
            self._pending.append(lambda: self._enter(run, routes, probs, resident))
            return None, len(caches), logits, nxt
        missed = self._visit_fused(run, routes, probs, resident)
        if missed is None:
            return None, len(caches), logits, nxt
        (_, run.positions, run.inject, run.valid, run.counted, run.mask, run.index,
         run.rope) = self.pieces.prepare(self.params, *args, meta)
        return inputs[missed], self.store.layers[missed], None, None

    def _enter(self, run: "_Pass", routes=None, probs=None, resident=None) -> None:
        """A forward's trace rows; for a deferred fused forward first its visits (which
        cannot miss: every expert was resident)."""
        if run.deferred and self._visit_fused(run, routes, probs, resident) is not None:
            raise AssertionError("a deferred fused forward missed an expert")
        self._record(run.routed, run.pregates, run.tokens, run.token_mask, run.counted,
                     int(not run.from_zero), run.request_ids, run.hidden)
        self._lap("record")

    def _visit_fused(self, run: "_Pass", routes, probs, resident: frozenset) -> int | None:
        """A fused forward's visits, in layer order, up to the first MoE layer whose routing
        needs an expert not in `resident` (the keys the call read); returns that layer's index
        in the MoE layers (its loads issued), or None when no layer missed."""
        routes, probs = jax.device_get((routes, probs))
        self._lap("routing wait")
        layers = self.store.layers
        for li, layer in enumerate(layers):
            ids, kept, pre = routes[li]
            kept = kept.astype(bool)
            needed = frozenset(np.unique(ids[kept]).tolist())
            if any((layer, e) not in resident for e in needed):
                return li
            plan, _ = self._visit(run, li, probs[li], ids, kept,
                                  None if li + 1 == len(layers) else pre)
            self._settle(None, None, None, None, plan, layer, needed, resident, None, None)
        return None

    def _layers(self, run: "_Pass", start: int, x, caches):
        """Layers start.. of a forward, one at a time; `caches` is updated in place. A MoE
        layer: attention, router and pre-gate, then its experts from the pool through the device
        table as it stands -- both dispatched before the routing is known (optimistic) -- then
        the routing is read (the host waits for the router only, the experts keep computing)
        and checked; a layer that read an unresident expert is recomputed after its loads."""
        p, layers = self.params["decoder"], self.store.layers
        for i in range(start, len(caches)):
            pl = p[f"layer_{i}"]
            if i not in layers:
                x, caches[i] = self.pieces.dense_layer(i)(pl, x, run.mask, run.positions,
                                                          run.valid, caches[i], run.index,
                                                          run.from_zero)
                x = x + run.inject[i] if i < len(run.inject) else x
                self._lap("dense layer", i, wait=x)
                continue
            li = layers.index(i)
            nxt = layers[li + 1] if li + 1 < len(layers) else None
            x_in = x
            if li == 0 and self.policy.uses_forecast:
                run.forecast = self._admit(run, x)
                self._lap("admit", i)
            p_next = None if nxt is None else p[f"layer_{nxt}"]
            heads = (None, None) if self.lookahead is None else (self.lookahead.params,
                                                                 self._rows[li])
            resident = self.pool.resident()
            wait = self.dispatch == "wait" or (self.dispatch == "adaptive" and
                                               self._missed.get((i, run.tokens.shape[1]), False))
            x, acc, x_mid, h, routing, routes, caches[i], ahead = \
                (self._layer_waiting if wait else self._layer)(
                    *heads, pl, p_next, self.pool.arrays, self.pool.device_table(),
                    self._rows[li], x, run.mask, run.positions, run.valid, caches[i], run.index,
                    run.from_zero)
            self._lap("layer piece", i, wait=x)
            ids, kept, pre = jax.device_get(routes)
            ahead = None if ahead is None else np.asarray(ahead)
            self._lap("routing wait", i)
            if self.record_hidden:
                run.hidden["hidden"][li], run.hidden["hidden_pre"][li] = x_mid, x_in
            if ahead is not None:
                ahead = {layers[li + o]: probs for o, probs in
                         self.lookahead.for_layer(li, ahead, run.token_mask).items()}
            plan, needed = self._visit(run, li, routing.probs, ids, kept.astype(bool),
                                       None if nxt is None else pre, ahead)
            x, self._missed[i, run.tokens.shape[1]] = self._settle(
                pl, x_mid, h, routing, plan, i, needed, resident, x, acc, wait)
            x = x + run.inject[i] if i < len(run.inject) else x
        return x

    def _visit(self, run: "_Pass", li: int, probs, ids, kept, pregate, ahead=None):
        """MoE layer li's routing (host arrays) into the trace, the visit stream and the cache
        core: (the core's plan, the experts the layer's tokens need)."""
        layers = self.store.layers
        layer, nxt = layers[li], (layers[li + 1] if li + 1 < len(layers) else None)
        run.routed[layer] = {"expert_ids": ids, "probs": probs}
        hint = None
        if pregate is not None:
            run.pregates[nxt] = pregate
            hint = frozenset(np.unique(pregate[run.token_mask.astype(bool)]).tolist())
        experts, pairs = np.unique(ids[kept], return_counts=True)
        needed = frozenset(experts.tolist())
        visit = Visit(layer, needed, run.forward, hint, run.forecast if li == 0 else None,
                      int(run.token_mask.sum()), ahead, tuple(zip(experts.tolist(),
                                                                  pairs.tolist())))
        self.stream.append(visit)
        plan = self.core.visit(len(self.stream) - 1, visit)
        self._lap("plan", layer)
        return plan, needed

    def _settle(self, p_layer, x_mid, h, routing, plan, layer: int, needed: frozenset,
                resident: frozenset, x, acc, waited: bool = False):
        """Carry out a visit's plan after its layer's piece ran on the `resident` keys: frees,
        the host's share, every round's loads (the policy's decisions, whether or not the layer
        needs them now), then the experts the piece did not compute -- for an optimistic piece
        the unresident ones (a recompute: each round's missing experts fill their pairs of the
        piece's acc and the layer's output is combined again), for a `waited` piece all of
        them, round by round. Then the prefetches. Returns (x after the layer -- None for a
        fused forward's visit, which only books --, whether the layer read an unresident
        expert)."""
        for key in plan.dropped:
            self._free(key)
        unresident = frozenset(e for e in needed if (layer, e) not in resident)
        todo = needed if waited else unresident               # experts the piece lacks
        for e in needed - todo:                     # the layer's piece already waits for them
            self._inflight.pop((layer, e), None)
        host = self._host_pairs(layer, plan.host, h, routing)      # overlaps the rounds
        row = self._rows[self.store.layers.index(layer)]
        what = "experts" if waited else "recompute"
        combined = not waited                        # the optimistic piece combined its output
        for r in plan.rounds:
            self._execute(r.loads)
            self._lap("loads", layer, wait=self.pool.arrays)
            now = r.experts & todo
            if now:                       # the piece's update waits for the copies it reads
                x, acc = self._experts(p_layer, self.pool.arrays, self.pool.device_table(), row,
                                       self._mask(now), acc, x_mid, h, routing)
                self.stats.recomputed_pieces += not waited
                combined = True
                self._lap(what, layer, wait=x)
        if host is not None:
            active, pairs = host
            acc = self.pieces.merge(acc, jax.device_put(pairs, self.pool.sharding),
                                    jax.device_put(active, self.pool.sharding),
                                    routing.expert_ids)
            combined = False
        if not combined:                      # host pairs, or a waited layer with no experts
            x, acc = self._experts(p_layer, self.pool.arrays, self.pool.device_table(), row,
                                   self._none, acc, x_mid, h, routing)
            self.stats.recomputed_pieces += not waited
            self._lap(what, layer, wait=x)
        self._execute(plan.prefetch)                  # overlaps this layer's compute
        self._lap("prefetch", layer, wait=self.pool.arrays)
        if waited:
            self.stats.waited_layers += 1
        elif unresident:
            self.stats.recomputed_layers += 1
            self.stats.recomputed_per_layer[layer] = \
                self.stats.recomputed_per_layer.get(layer, 0) + 1
        return x, bool(unresident)

    def _mask(self, experts: frozenset) -> np.ndarray:
        """(E,) bool, True for `experts` (a host array: it travels with the piece's call)."""
        active = np.zeros(self.store.num_experts, bool)
        active[sorted(experts)] = True
        return active

    def _lap(self, what: str, layer: int | None = None, wait=None) -> None:
        """Close a lap of the forward's clock: the time since the last lap went to `what` (and
        to `layer`'s row). The engine does not wait on the device to time it: `routing wait`
        laps hold the device time the host waited for. With `profile` it does wait (for
        `wait`, the lap's device work), so each lap holds its own device time -- a breakdown
        that serializes host and device, for finding where the time goes, not for speed."""
        if self.profile and wait is not None:
            jax.block_until_ready(wait)
        now = time.perf_counter()
        spent, self._last = now - self._last, now
        self.stats.time_s[what] = self.stats.time_s.get(what, 0.0) + spent
        if layer is not None:
            row = self.stats.layer_s.setdefault(layer, {})
            row[what] = row.get(what, 0.0) + spent

    def _admit(self, run: "_Pass", x) -> np.ndarray:
        """A forward's admission, before its first MoE layer: the forecaster's (L_moe, E)
        forecast (a predictor may read that layer's input states x) and the policy's
        prefetches."""
        b, t = run.tokens.shape
        forecast = np.asarray(self.forecaster.for_forward(run.forward, run.tokens,
                                                          run.token_mask,
                                                          prefill=run.from_zero, states=x))
        first = Visit(self.store.layers[0], frozenset(), run.forward, None, forecast, b * t)
        self._execute(self.core.admit(len(self.stream), first))
        return forecast

    def _moe(self, p_layer, x, h, routing, plan, layer: int):
        b, t, _ = h.shape
        k = routing.expert_ids.shape[-1]
        acc = jax.device_put(jnp.zeros((b * t, k, self.pool.arrays["w_down"].shape[-1]),
                                       self.dtype), self.pool.sharding)
        for key in plan.dropped:
            self._free(key)
        host = self._host_pairs(layer, plan.host, h, routing)      # overlaps the rounds
        for r in plan.rounds:
            self._execute(r.loads)
            self._wait(layer, r.experts)
            active = np.zeros(self.store.num_experts, bool)
            active[sorted(r.experts)] = True
            slot_of = jnp.asarray(self.pool.slot_table(layer))
            acc = self._pairs(self.pool.arrays, slot_of, jnp.asarray(active), acc, h, routing)
        if host is not None:
            active, pairs = host
            acc = self.pieces.merge(acc, jax.device_put(pairs, self.pool.sharding),
                                    jax.device_put(active, self.pool.sharding),
                                    routing.expert_ids)
        out = self.pieces.combine(p_layer, x, h, acc, routing)
        self._execute(plan.prefetch)                  # overlaps this layer's compute
        return out

    def _host_pairs(self, layer: int, experts: frozenset, h, routing):
        """Dispatch the host's share of a layer (async): (active mask, pairs) or None."""
        if not experts:
            return None
        active = np.zeros(self.store.num_experts, bool)
        active[sorted(experts)] = True
        dev = self.host_device
        weights = self.store.host_weights(layer, dev)
        pairs = self.pieces.host_pairs(weights, jax.device_put(active, dev),
                                       jax.device_put(h, dev), jax.device_put(routing, dev))
        return active, pairs

    def _record(self, routed, pregates, tokens, token_mask, positions, phase: int,
                request_ids, hidden) -> None:
        b, t = token_mask.shape
        layers = self.store.layers
        pre = np.full((b, t, len(layers), self.cfg.decoder.moe.top_k), -1, np.int16)
        for li, layer in enumerate(layers):
            if layer in pregates:
                pre[:, :, li] = pregates[layer]
        states = {name: np.stack([np.asarray(per[li], np.float16) for li in range(len(layers))],
                                 axis=2) if per else None                     # (B, T, L, D)
                  for name, per in hidden.items()}
        self.recorder.add({"decoder": routed}, token_mask, request_ids, np.asarray(positions),
                          phase, pre, tokens, **states)

    def trace(self):
        return self.recorder.trace()

    # -- generation -------------------------------------------------------------------------------
    def generate(self, tokens, token_mask, images=None, *, max_new_tokens: int,
                 sampling: Sampling = GREEDY, stop_tokens=None, return_logits: bool = False,
                 request_ids=None) -> GenerationResult:
        """Prefill + decode steps over a KV cache, like `moex.generate.Generator`."""
        cfg = self.cfg
        tokens, token_mask = check_inputs(cfg, tokens, token_mask, images, max_new_tokens)
        b, t = tokens.shape
        stop = stop_ids(cfg, stop_tokens)
        cache = init_cache(cfg.decoder, b, t + max_new_tokens, self.dtype)
        start = time.perf_counter()
        logits, cache = self.forward(tokens, token_mask, cache, fresh_cache=True, images=images,
                                     last_only=True, request_ids=request_ids)
        ones = np.ones((b, 1), np.int32)
        out, all_logits = self._decode_loop(
            start, logits, cache, lambda nxt, cache, i: self.forward(
                nxt[:, None], ones, cache, request_ids=request_ids, defer=True),
            max_new_tokens, sampling, stop)
        return result(cfg, out, stop, max_new_tokens, all_logits if return_logits else None)

    def _decode_loop(self, start: float, logits, cache, step, max_new_tokens: int,
                     sampling: Sampling, stop):
        """Sample from a prefill's last logits (its pass began at `start`), then feed each
        token through `step(tokens (B,), cache, index of the step) -> (logits, cache)` until
        every row stopped or N tokens were sampled; sets `timings` (prefill and decode seconds,
        the decode's stall, loads and bytes). Returns (ids per step, logits per step)."""
        jax.block_until_ready(logits)
        prefill_s, visits = time.perf_counter() - start, len(self.stream)
        stall, loads, moved = self.stats.stall_s, self.pool.loads, self.pool.bytes_loaded
        recomputed, fused, waited = self.stats.recomputed_layers, self.stats.fused, \
            self.stats.waited_layers
        spent = _snapshot(self.stats)
        out, all_logits = [], []
        done = np.zeros(logits.shape[0], bool)
        try:
            for i in range(max_new_tokens):
                last = np.asarray(logits)[:, -1]
                all_logits.append(last)
                nxt = np.asarray(_sample(last, sampling, i))
                nxt = np.where(done, self.cfg.pad_token_id, nxt).astype(np.int32)
                out.append(nxt)
                done = done | np.isin(nxt, stop)
                if done.all() or i + 1 == max_new_tokens:
                    break
                logits, cache = step(nxt, cache, i + 1)
        finally:
            self.flush()                          # the last deferred steps' visits
        self.timings = {"prefill_s": prefill_s, "prefill_visits": visits,
                        "decode_s": time.perf_counter() - start - prefill_s,
                        "decode_steps": len(out) - 1, "decode_stall_s": self.stats.stall_s - stall,
                        "decode_loads": self.pool.loads - loads,
                        "decode_bytes": self.pool.bytes_loaded - moved,
                        "decode_recomputed": self.stats.recomputed_layers - recomputed,
                        "decode_fused": self.stats.fused - fused,
                        "decode_waited": self.stats.waited_layers - waited,
                        "decode_time_s": _since(spent, self.stats)}
        return out, all_logits

    def greedy(self, tokens, token_mask, max_new_tokens: int):
        """Greedy continuation (B, N) and the logits (B, N, V) that chose it (no stop token)."""
        out = self.generate(tokens, token_mask, max_new_tokens=max_new_tokens, stop_tokens=(),
                            return_logits=True)
        return out.tokens, out.logits

    # -- report -----------------------------------------------------------------------------------
    def report(self) -> dict:
        """Stats of the run so far; per layer also bytes moved and seconds stalled (call
        `calibrate_copy` first for the copy-time estimate)."""
        s = self.core.stats
        copy_s = s.loads * self.stats.copy_s_per_expert
        counts = s.as_dict()
        for layer, row in counts["per_layer"].items():
            row["stall_s"] = self.stats.stall_per_layer.get(layer, 0.0)
            row["recomputed"] = self.stats.recomputed_per_layer.get(layer, 0)
            if self.core.misses is None:          # every load moves one stored copy
                row["bytes_moved"] = (row["misses"] + row["prefetches"]) * \
                    self.store.stored_bytes
        return {"policy": self.policy.name, "slots": self.pool.num_slots,
                "budget_bytes": self.pool.budget_bytes, "pool_bytes": self.pool.pool_bytes,
                "expert_bytes": self.store.expert_bytes, "total_expert_bytes":
                self.store.total_bytes, "memory_kind": self.store.memory_kind,
                "expert_dtype": quant.label(self.store.fmt),
                "stored_expert_bytes": self.store.stored_bytes,
                "low_dtype": quant.label(self.store.low_fmt) if self.store.low_fmt else None,
                "bytes_moved": self.pool.bytes_loaded, "loads": self.pool.loads,
                "stall_s": self.stats.stall_s, "copy_s_estimate": copy_s,
                "hidden_fraction": hidden_fraction(self.stats.stall_s, copy_s),
                "recomputed_layers": self.stats.recomputed_layers,
                "recomputed_pieces": self.stats.recomputed_pieces,
                "waited_layers": self.stats.waited_layers,
                "fused_forwards": self.stats.fused, **counts}


def _snapshot(stats: EngineStats) -> dict:
    return {"forward": dict(stats.time_s),
            **{layer: dict(acts) for layer, acts in stats.layer_s.items()}}


def _since(before: dict, stats: EngineStats) -> dict:
    """Seconds per activity since `before` (a _snapshot): {"forward": {activity: s} for the
    activities outside any layer, layer: {activity: s}}."""
    now = _snapshot(stats)
    out = {key: {a: s - before.get(key, {}).get(a, 0.0) for a, s in acts.items()}
           for key, acts in now.items()}
    for layer, acts in out.items():
        if layer != "forward":
            for a, s in acts.items():
                out["forward"][a] = out["forward"].get(a, 0.0) - s
    return {key: {a: s for a, s in acts.items() if s > 1e-12} for key, acts in out.items()}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):                     # the first call warms up (compiles)
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _probe_rows(cfg: VLMConfig, n: int, device):
    """n rows of hidden state whose every token picks expert 0 (and others): (h, routing)."""
    d = cfg.decoder
    logits = jnp.zeros((1, n, d.moe.num_experts)).at[..., 0].set(10.0)
    routing = route(logits, top_k=d.moe.top_k, renormalize=True)
    h = jnp.ones((1, n, d.d_model), jnp.dtype(cfg.dtype))
    return jax.device_put(h, device), jax.device_put(routing, device)


def host_device_for(device):
    """The CPU device that computes host-served experts: the first CPU device that is not
    `device` when there is one (a GPU's host; on a CPU backend with several devices, another
    device), else `device` itself."""
    cpus = [d for d in jax.devices("cpu") if d != device]
    return cpus[0] if cpus else device


def hidden_fraction(stall_s: float, copy_s: float) -> float:
    """1 - stall / copy time, clipped to [0, 1] (a stall also holds the wait's own overhead)."""
    return min(1.0, max(0.0, 1.0 - stall_s / copy_s)) if copy_s else 1.0


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_jit(logits, sampling, step):
    return sample(logits, sampling, step)


def _sample(logits, sampling: Sampling, step: int):
    """moex.generate.sample on host logits (B, V); greedy is numpy's argmax (the same first
    maximum as jnp.argmax), without a device round trip."""
    if sampling.temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int32)
    return _sample_jit(logits, sampling, jnp.int32(step))
