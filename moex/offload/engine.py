"""Live offload engine: the decoder runs layer by layer; hard-MoE experts come from the slot pool.

Shape letters: B batch, T new tokens, D width, K choices per token, E experts, L_moe MoE layers.

A forward (prefill or decode step):
  1. embeddings (and, with images, the vision tower + projector, spliced at the placeholders);
  2. admission, before the first MoE layer: a `predictive` policy gets the forecaster's
     (L_moe, E) forecast (a routing-path predictor may read that layer's input states) and its
     prefetches are issued (async `device_put`) before any expert computes;
  3. per decoder layer: dense layers run whole. For a MoE layer a jitted piece runs attention,
     the router and the pre-gate (the next MoE layer's router on this layer's hidden state); the
     engine reads the routing (one device -> host sync), the `CacheCore` turns it into rounds of
     demand loads (misses first) and a list of prefetches; per round the engine loads the missing
     experts, waits for the copies of the experts the round needs (that wait is the *stall*) and
     runs the round's experts through the expert->slot table; after the layer's compute is
     dispatched it issues the prefetches, which overlap that compute and the next attention.
     With a miss rule (`moex.offload.misses`) a missed expert may instead load its
     low-precision copy (upgraded in the background, with the prefetches) or run on the host
     CPU device on the rows that picked it: the layer's activations and routing are copied
     there, its pairs are computed from the store's weights (dispatched before the device's
     rounds, so the two overlap) and copied back into the same per-pair buffer.
     With lookahead heads (the `lookahead` policy, predictive's combined form) the layer's heads
     run on the same hidden state, compiled into the same piece as the router, and their
     predictions for the layers ahead come back in the same sync as the routing.
Every piece runs the model's own moex.nn modules on the model's params (`LayerPieces`); the
experts' pairs take the config's `compute` route, whose 'auto' on a pool gathers or sorts.
Expert outputs are kept per token-expert pair, each round filling its experts' pairs, and
combined once, so rounds, budgets and policies all run the same compiled pieces on the same
weights: logits are bitwise identical across them. `stream` records the visits (with their
hints) for exact replay, and `trace()` the routing in the trace format.

Text decoders with sequential blocks and GQA attention (the offloaded layers); `belady` needs
the future and runs in the replay simulator only.
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
from moex.offload.cache import CacheCore, Visit, expert_rows
from moex.offload import quant
from moex.offload.misses import MissCosts
from moex.offload.policies import make_policy
from moex.offload.store import ExpertStore, SlotPool, moe_layers
from moex.offload.trace import TraceRecorder


@dataclasses.dataclass
class EngineStats:
    """Time and bytes of the engine's copies (counts are in `core.stats`)."""
    stall_s: float = 0.0                     # waiting for copies before a round computes
    copy_s_per_expert: float = 0.0           # calibrated host -> device copy of one expert
    stall_per_layer: dict = dataclasses.field(default_factory=dict)


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

      embed         tokens (and images) -> decoder inputs            VLM.embed
      dense_layer   a layer without a hard MoE, whole                DecoderLayer
      attend_route  attention with its residual, the FFN norm and    DecoderLayer.attend,
                    the router; and the pre-gate: the next MoE       DecoderLayer.ffn_input,
                    layer's router on this hidden state              HardMoE.route
      pairs         the active experts' pair outputs, from the pool  moex.nn.experts.pair_outputs
      combine       weighted sum over K, shared experts, residual    HardMoE.combine
      head          final norm and LM head                           Decoder.head

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

    @functools.cached_property
    def attend_route(self):
        return jax.jit(self._attend_route_pregate, static_argnums=(8,))

    @functools.lru_cache(maxsize=None)
    def attend_route_ahead(self, heads):
        """attend_route and lookahead heads in one compiled piece: `heads(head_params, x,
        index)` maps the post-attention state x (B, T, D) of MoE layer `index` to per-token
        probabilities (B, T, O, E) (`moex.predict.lookahead.layer_fn`); one dispatch, and its
        result comes back in the same sync as the routing."""
        def run(head_params, head_index, *args):
            out = self._attend_route_pregate(*args)
            return (*out, heads(head_params, out[0], head_index))
        return jax.jit(run, static_argnums=(10,))

    @functools.cached_property
    def pairs(self):
        d = self.cfg.decoder

        def run(pool, slot_of, active, acc, h, routing):
            pairs = pair_outputs(pool, h, routing, d.activation, self.dtype,
                                 pair_compute(d.moe.compute), d.moe.grouped_matmul, slot_of,
                                 active)
            mine = active[routing.expert_ids.reshape(acc.shape[:2])]
            return jnp.where(mine[..., None], pairs, acc)
        return jax.jit(run, donate_argnums=(3,))

    @functools.lru_cache(maxsize=None)
    def pairs_quantized(self, fmt, dtype: str):
        """`pairs` on a pool of quantized slots: the layer's E slots (through the expert->slot
        table; unresident ones read slot 0 and are masked by `active`) are dequantized as the
        slot update would, then computed through an identity table -- the same route and
        values as dequantized slots, so the numbers are bitwise the same."""
        d = self.cfg.decoder

        def run(pool, slot_of, active, acc, h, routing):
            stored = {w: a[jnp.maximum(slot_of, 0)] for w, a in pool.items()}
            weights = jax.vmap(lambda e: quant.dequantize_expert(e, fmt, jnp.dtype(dtype)))(
                stored)
            pairs = pair_outputs(weights, h, routing, d.activation, self.dtype,
                                 pair_compute(d.moe.compute), d.moe.grouped_matmul,
                                 jnp.arange(slot_of.shape[0], dtype=jnp.int32), active)
            mine = active[routing.expert_ids.reshape(acc.shape[:2])]
            return jnp.where(mine[..., None], pairs, acc)
        return jax.jit(run, donate_argnums=(3,))

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

    @functools.cached_property
    def combine(self):
        layer = self._moe_layer

        def run(p, x, h, pairs, routing):
            return x + layer.apply({"params": p}, h, pairs, routing, method=_combine)
        return jax.jit(run)

    @functools.lru_cache(maxsize=None)
    def dense_layer(self, i: int):
        layer = self._layer(i)

        def run(p, x, mask, positions, valid, cache, index, from_zero):
            x, cache, _ = layer.apply({"params": p}, x, mask, positions, valid, cache, index,
                                      from_zero)
            return x, cache
        return jax.jit(run, static_argnums=(7,))

    @functools.cached_property
    def embed(self):
        """(params, tokens, images, token_mask, start) -> (x, multimodal positions or None,
        DeepStack injections): VLM.inputs."""
        def run(params, tokens, images, token_mask, start):
            return self.model.apply({"params": params}, tokens, images, token_mask, start,
                                    method=VLM.inputs)[:3]
        return jax.jit(run)

    @functools.cached_property
    def head(self):
        def run(params, x):
            return self.model.apply({"params": params}, x, method=_head)
        return jax.jit(run)


@functools.lru_cache(maxsize=8)
def pieces_for(cfg: VLMConfig) -> LayerPieces:
    return LayerPieces(cfg)


class OffloadEngine:
    def __init__(self, cfg: VLMConfig, params, policy: str, budget_bytes: int, device=None,
                 forecaster=None, rounds: bool = True, store: ExpertStore | None = None,
                 lookahead=None, record_hidden: bool = False, misses=None, host_device=None,
                 quantized_slots: bool = False):
        """params: the model's params (experts are moved to host memory), or None with `store`
        (an ExpertStore built once and shared by several engines). lookahead: trained heads
        (`moex.predict.lookahead.LookaheadHints`) for the lookahead policy and for predictive's
        combined form. record_hidden: the trace also records each MoE layer's hidden states
        (trace fields `hidden`, `hidden_pre`: what the heads train on)."""
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
        if lookahead is not None:                 # the fused attention + heads piece
            self._attend_ahead = self.pieces.attend_route_ahead(lookahead.layer_fn)
        self._pairs = (self.pieces.pairs_quantized(self.store.fmt, str(self.store.dtype))
                       if self.pool.quantized else self.pieces.pairs)   # chosen once
        self._forward = 0

    # -- copies -----------------------------------------------------------------------------------
    def _free(self, key) -> None:
        self.pool.free(key)
        self._inflight.pop(key, None)

    def _execute(self, loads) -> None:
        """Issue loads (async): evictions free slots, then each key is copied into a free slot
        (its low-precision copy for kind "low"; an upgrade rewrites the key's own slot)."""
        for load in loads:
            if load.victim is not None:
                self._free(load.victim)
            slot = self.pool.slot_of(load.key) if load.kind == "upgrade" else None
            self._inflight[load.key] = self.pool.load(load.key, slot, low=load.kind == "low")

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
                last_only: bool = False, request_ids=None):
        """Logits (B, T, V) float32 (T = 1 with last_only) and the new cache, like the model's
        forward. request_ids (B,) label the rows in the trace (default 0..B-1)."""
        p, d = self.params["decoder"], self.cfg.decoder
        tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
        b, t = tokens.shape
        moe_layers = self.store.layers
        forecast = None
        # x with image tokens spliced in; with Qwen3-VL images also multimodal RoPE positions
        # and the DeepStack injections added after layers 0, 1, ... (moex.nn.vlm)
        x, rope, inject = self.pieces.embed(
            self.params, jnp.asarray(tokens), None if images is None else jnp.asarray(images),
            jnp.asarray(token_mask), None if cache is None else cache["pos"])
        # committed to the pool's device like everything computed from the pool, so each piece
        # sees one argument placement (and compiles once)
        x, rope, inject = jax.device_put((x, rope, inject), self.pool.sharding)
        valid, positions, mask, index = attention_inputs(d, jnp.asarray(token_mask), cache)
        counted, positions = positions, (positions if rope is None else rope)
        from_zero = cache is None or fresh_cache
        caches = [None] * d.num_layers if cache is None else cache["layers"]
        new_layers, routed, pregates, hidden = [], {}, {}, {"hidden": {}, "hidden_pre": {}}
        for i, lc in enumerate(caches):
            pl = p[f"layer_{i}"]
            if i not in moe_layers:
                x, lc = self.pieces.dense_layer(i)(pl, x, mask, positions, valid, lc, index,
                                                   from_zero)
                x = x + inject[i] if i < len(inject) else x
                new_layers.append(lc)
                continue
            li = moe_layers.index(i)
            nxt = moe_layers[li + 1] if li + 1 < len(moe_layers) else None
            x_in = x
            if li == 0 and self.policy.uses_forecast:
                forecast = self._admit(tokens, token_mask, x, cache is None or fresh_cache)
            p_next = None if nxt is None else p[f"layer_{nxt}"]
            ahead = None
            if self.lookahead is None:
                x, h, routing, pregate, lc = self.pieces.attend_route(
                    pl, p_next, x, mask, positions, valid, lc, index, from_zero)
            else:
                x, h, routing, pregate, lc, ahead = self._attend_ahead(
                    self.lookahead.params, jnp.int32(li), pl, p_next, x, mask, positions, valid,
                    lc, index, from_zero)
            new_layers.append(lc)
            if self.record_hidden:
                hidden["hidden"][li], hidden["hidden_pre"][li] = x, x_in
            ids, kept = np.asarray(routing.expert_ids), np.asarray(routing.kept)
            if ahead is not None:
                ahead = {moe_layers[li + o]: probs for o, probs in
                         self.lookahead.for_layer(li, ahead, token_mask).items()}
            routed[i] = {"expert_ids": ids, "probs": routing.probs}
            hint = None
            if pregate is not None:
                pregates[nxt] = np.asarray(pregate)
                hint = frozenset(int(e) for e in pregates[nxt][token_mask.astype(bool)].ravel())
            visit = Visit(i, frozenset(int(e) for e in ids[kept]), self._forward, hint,
                          forecast if li == 0 else None, int(token_mask.sum()), ahead,
                          expert_rows(ids[kept]))
            self.stream.append(visit)
            x = self._moe(pl, x, h, routing, self.core.visit(len(self.stream) - 1, visit), i)
            x = x + inject[i] if i < len(inject) else x
        x = x[:, -1:] if last_only else x
        logits = self.pieces.head(self.params, x)
        self._record(routed, pregates, tokens, token_mask, counted, int(not from_zero),
                     np.arange(b) if request_ids is None else np.asarray(request_ids), hidden)
        self._forward += 1
        return logits, (None if cache is None else advance_cache(cache, valid, new_layers, rope))

    def _admit(self, tokens, token_mask, x, prefill: bool) -> np.ndarray:
        """A forward's admission, before its first MoE layer: the forecaster's (L_moe, E)
        forecast (a predictor may read that layer's input states x) and the policy's
        prefetches."""
        b, t = tokens.shape
        forecast = np.asarray(self.forecaster.for_forward(self._forward, tokens, token_mask,
                                                          prefill=prefill, states=x))
        first = Visit(self.store.layers[0], frozenset(), self._forward, None, forecast, b * t)
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
                nxt[:, None], ones, cache, request_ids=request_ids),
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
        out, all_logits = [], []
        done = np.zeros(logits.shape[0], bool)
        for i in range(max_new_tokens):
            all_logits.append(np.asarray(logits[:, -1]))
            nxt = np.asarray(_sample(logits[:, -1], sampling, i))
            nxt = np.where(done, self.cfg.pad_token_id, nxt).astype(np.int32)
            out.append(nxt)
            done = done | np.isin(nxt, stop)
            if done.all() or i + 1 == max_new_tokens:
                break
            logits, cache = step(nxt, cache, i + 1)
        self.timings = {"prefill_s": prefill_s, "prefill_visits": visits,
                        "decode_s": time.perf_counter() - start - prefill_s,
                        "decode_steps": len(out) - 1, "decode_stall_s": self.stats.stall_s - stall,
                        "decode_loads": self.pool.loads - loads,
                        "decode_bytes": self.pool.bytes_loaded - moved}
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
                "hidden_fraction": hidden_fraction(self.stats.stall_s, copy_s), **counts}


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
    return _sample_jit(logits, sampling, jnp.int32(step))
