"""The offload engine on encoder-decoder models (Switch Transformers): encoder and decoder experts
stream from host memory through one slot pool.

Shape letters: B batch, S encoder length, D width, K choices per token, E experts.

A request batch is one encoder pass, then decoder steps:
  encoder pass  every encoder block in order; a Switch block runs attention, its router and the
                pre-gate (the stack's next MoE block's router on this hidden state) as one
                jitted piece, then the cache core's rounds of loads and expert compute from the
                pool, exactly as `moex.offload.engine.OffloadEngine` runs a decoder layer. Its
                routing is then known for every input token -- before decoding starts -- and is
                recorded (phase-0 rows of the trace).
  cross cache   every decoder block's cross-attention keys and values of the encoder output,
                once per request batch.
  decoder step  each decoder block: self-attention over the step cache, cross-attention, then
                the FFN (a Switch block's experts from the pool).
Each pass is one "forward" of the cache core's stream: a `predictive` policy's forecaster is
asked for an (L_moe, E) forecast at the pass's first MoE layer (the encoder's first for the
encoder pass, the decoder's first for a step; a routing-path predictor reads the encoder input).
MoE layer ids are global: encoder block i -> i, decoder block j -> encoder_layers + j.

The pieces run the model's own blocks (moex.nn.encdec.Block) on the model's params; expert
pairs are computed per round into one per-pair buffer and combined once, so logits are bitwise
the same under every policy and budget. Miss rules (low-precision / host-computed misses),
quantized slots and lookahead heads are the decoder engine's only.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import EncDecConfig
from moex.generate import GREEDY, GenerationResult, Sampling, result, stop_ids
from moex.model import build
from moex.nn.encdec import Block, EncoderDecoder, decoder_mask, encoder_mask, init_cache
from moex.nn.experts import pair_outputs
from moex.nn.moe import HardMoE
from moex.offload.cache import CacheCore, Visit, expert_rows
from moex.offload.forecast import reference_run
from moex.offload.engine import EngineStats, OffloadEngine, host_device_for, pair_compute
from moex.offload.policies import make_policy
from moex.offload.store import ExpertStore, SlotPool, expert_moe
from moex.offload.trace import TraceRecorder
from moex.seq2seq import check_inputs


def _self_attend(block: Block, x, mask, bias, cache, index):
    return block.self_attend(x, mask, bias, cache, index)


def _route(block: Block, x, valid):
    """The block's FFN input and its routing."""
    h = block.ffn_input(x)
    return h, block.ffn.route(h, valid)


def _pregate(block: Block, x, valid):
    return block.ffn.route(block.ffn_input(x), valid).expert_ids


def _dense_ffn(block: Block, x, valid):
    return block.feed_forward(x, valid)[0]


def _cross(block: Block, x, cross_kv, enc_valid):
    return block.cross_attend(x, cross_kv, enc_valid)


class Seq2SeqPieces:
    """Jitted pieces of one encoder-decoder config, shared by every engine of it (policies and
    budgets never recompile). A block's piece serves every block of its stack and kind: the
    block index only picks the FFN kind."""

    def __init__(self, cfg: EncDecConfig):
        self.cfg, self.model = cfg, build(cfg)
        self.dtype, self.moe = jnp.dtype(cfg.dtype), expert_moe(cfg)

    def block(self, decoder: bool, moe: bool) -> Block:
        c = self.cfg
        n, sel = ((c.decoder_layers, c.decoder_moe) if decoder
                  else (c.encoder_layers, c.encoder_moe))
        i = next(i for i in range(n) if sel.is_moe_layer(i) == moe)
        return Block(c, i, decoder, self.dtype, jnp.dtype(c.param_dtype))

    @functools.lru_cache(maxsize=None)
    def encoder_block(self, moe: bool):
        """(p_block, p_next, x, bias, valid) -> dense: x; MoE: (x after attention, h, routing,
        pre-gate ids of the next MoE block or None)."""
        block = self.block(False, moe)

        def run(p, p_next, x, bias, valid):
            x, _ = block.apply({"params": p}, x, encoder_mask(valid), bias, None, None,
                               method=_self_attend)
            if not moe:
                return block.apply({"params": p}, x, valid, method=_dense_ffn)
            h, routing = block.apply({"params": p}, x, valid, method=_route)
            pre = None if p_next is None else block.apply({"params": p_next}, x, valid,
                                                          method=_pregate)
            return x, h, routing, pre
        return jax.jit(run)

    @functools.lru_cache(maxsize=None)
    def decoder_block(self, moe: bool):
        """(p_block, p_next, x, bias, layer cache, index, cross k/v, encoder valid) -> dense:
        (x, cache); MoE: (x after attention, h, routing, pre-gate ids or None, cache)."""
        block = self.block(True, moe)

        def run(p, p_next, x, bias, cache, index, cross_kv, enc_valid):
            mask = decoder_mask(index, x.shape[1], cache["k"].shape[1], x.shape[0])
            x, cache = block.apply({"params": p}, x, mask, bias, cache, index,
                                   method=_self_attend)
            x = block.apply({"params": p}, x, cross_kv, enc_valid, method=_cross)
            valid = jnp.ones(x.shape[:2], bool)
            if not moe:
                return block.apply({"params": p}, x, valid, method=_dense_ffn), cache
            h, routing = block.apply({"params": p}, x, valid, method=_route)
            pre = None if p_next is None else block.apply({"params": p_next}, x, valid,
                                                          method=_pregate)
            return x, h, routing, pre, cache
        return jax.jit(run)

    def _model(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)

    @functools.cached_property
    def embed(self):
        return jax.jit(lambda params, tokens: self._model(params, tokens,
                                                          method=EncoderDecoder.embed))

    @functools.cached_property
    def bias(self):
        """(params, query positions, key positions, decoder: static) -> (1, H, T, S)."""
        def run(params, q, k, decoder):
            stack = lambda m: (m.decoder if decoder else m.encoder).bias(q, k)
            return self._model(params, method=stack)
        return jax.jit(run, static_argnums=(3,))

    @functools.cached_property
    def finish_encoder(self):
        """(params, x) -> (cross-attention k/v of every decoder block) of the final-normed x."""
        def run(params, x):
            enc = self._model(params, x, method=lambda m, x: m.encoder.final_norm(x))
            return self._model(params, enc, method=EncoderDecoder.cross_cache)
        return jax.jit(run)

    @functools.cached_property
    def head(self):
        return jax.jit(lambda params, x: self._model(params, x, method=EncoderDecoder.head))

    @functools.cached_property
    def pairs(self):
        moe, act = self.moe, self.cfg.activation

        def run(pool, slot_of, active, acc, h, routing):
            pairs = pair_outputs(pool, h, routing, act, self.dtype, pair_compute(moe.compute),
                                 moe.grouped_matmul, slot_of, active)
            mine = active[routing.expert_ids.reshape(acc.shape[:2])]
            return jnp.where(mine[..., None], pairs, acc)
        return jax.jit(run, donate_argnums=(3,))

    @functools.cached_property
    def combine(self):
        ffn = HardMoE(self.moe, self.cfg.activation, False, self.dtype)

        def run(p, x, h, pairs, routing):
            return x + ffn.apply({"params": p["ffn"]}, h, pairs, routing, method=HardMoE.combine)
        return jax.jit(run)


@functools.lru_cache(maxsize=8)
def seq2seq_pieces_for(cfg: EncDecConfig) -> Seq2SeqPieces:
    return Seq2SeqPieces(cfg)


class Seq2SeqOffloadEngine(OffloadEngine):
    """`OffloadEngine`'s copies, rounds, cache core and report over an encoder-decoder's layer
    visits (this class adds the passes; see the module docstring)."""

    def __init__(self, cfg: EncDecConfig, params, policy: str, budget_bytes: int, device=None,
                 forecaster=None, rounds: bool = True, store: ExpertStore | None = None,
                 lookahead=None, record_hidden: bool = False, misses=None,
                 quantized_slots: bool = False):
        """As OffloadEngine's; lookahead heads, hidden-state traces, miss rules and quantized
        slots are refused by name (the decoder engine's only)."""
        for name, value in (("lookahead heads", lookahead), ("record_hidden", record_hidden),
                            ("a miss rule", misses), ("quantized slots", quantized_slots)):
            if value:
                raise ValueError(f"{cfg.name}: {name} are not available on the encoder-decoder "
                                 "engine")
        self.cfg = cfg
        if forecaster is not None:
            forecaster.check_model(cfg)
        self.store = store if store is not None else ExpertStore.from_params(cfg, params, device)
        self.pool = SlotPool(self.store, budget_bytes, device)
        self.policy = make_policy(policy, False)
        if self.policy.needs_future or self.policy.uses_lookahead:
            raise ValueError(f"{policy}: the encoder-decoder engine runs all-resident, "
                             "on-demand, lru, lfu, pregated and predictive (belady: replay the "
                             "trace with moex.offload.simulator)")
        if self.policy.uses_forecast and forecaster is None:
            raise ValueError(f"{policy} needs a forecaster (moex.offload.forecast)")
        self.forecaster, self.lookahead, self.record_hidden, self.misses = forecaster, None, \
            False, None
        self.host_device = host_device_for(self.pool.device)
        self.core = CacheCore(self.policy, self.pool.num_slots, self.store.layers,
                              self.store.num_experts, rounds, None)
        self.params = self.store.dense_params
        self.stream: list[Visit] = []
        self.recorder = TraceRecorder(cfg)
        self.stats, self.timings, self._inflight = EngineStats(), {}, {}
        self.dtype = jnp.dtype(cfg.dtype)
        self.pieces = seq2seq_pieces_for(cfg)
        self._pairs = self.pieces.pairs
        self._forward, self._pending = 0, []

    # -- one pass over a stack ---------------------------------------------------------------------
    def _stack(self, decoder: bool, x, tokens, token_mask, run_block):
        """Run one stack's blocks over x: `run_block(moe, p_block, p_next, x)` returns the
        dense block's new x, or a MoE block's (x, h, routing, pregate). Returns (x, routed)."""
        c = self.cfg
        n, stack = (c.decoder_layers, "decoder") if decoder else (c.encoder_layers, "encoder")
        offset = c.encoder_layers if decoder else 0
        layers = [i for i in self.store.layers if (i >= c.encoder_layers) == decoder]
        valid = np.asarray(token_mask).astype(bool)
        routed, pregates, forecast = {}, {}, None
        for i in range(n):
            p = self.params[stack][f"layer_{i}"]
            gid = offset + i
            if gid not in layers:
                x = run_block(False, p, None, x)
                continue
            li = layers.index(gid)
            if li == 0 and self.policy.uses_forecast:
                forecast = self._admit_at(gid, tokens, token_mask, x, not decoder)
            nxt = layers[li + 1] if li + 1 < len(layers) else None
            p_next = None if nxt is None else self.params[stack][f"layer_{nxt - offset}"]
            x, h, routing, pre = run_block(True, p, p_next, x)
            ids, kept = np.asarray(routing.expert_ids), np.asarray(routing.kept)
            routed[gid] = {"expert_ids": ids, "probs": routing.probs}
            hint = None
            if pre is not None:
                pregates[nxt] = np.asarray(pre)
                hint = frozenset(int(e) for e in pregates[nxt][valid].ravel())
            visit = Visit(gid, frozenset(int(e) for e in ids[kept]), self._forward, hint,
                          forecast if li == 0 else None, int(valid.sum()), None,
                          expert_rows(ids[kept]))
            self.stream.append(visit)
            x = self._moe(p, x, h, routing, self.core.visit(len(self.stream) - 1, visit), gid)
        return x, routed, pregates

    def _admit_at(self, layer: int, tokens, token_mask, x, prefill: bool) -> np.ndarray:
        b, t = np.shape(tokens)
        forecast = np.asarray(self.forecaster.for_forward(self._forward, tokens, token_mask,
                                                          prefill=prefill, states=x))
        first = Visit(layer, frozenset(), self._forward, None, forecast, b * t)
        self._execute(self.core.admit(len(self.stream), first))
        return forecast

    def encode(self, tokens, token_mask, request_ids=None):
        """The encoder pass: (cross-attention k/v of every decoder block, encoder valid)."""
        pc, params = self.pieces, self.params
        tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
        valid = jax.device_put(jnp.asarray(token_mask).astype(bool), self.pool.sharding)
        x = jax.device_put(pc.embed(params, jnp.asarray(tokens)), self.pool.sharding)
        pos = jnp.arange(tokens.shape[1])
        bias = pc.bias(params, pos, pos, False)

        def run_block(moe, p, p_next, x):
            return pc.encoder_block(moe)(p, p_next, x, bias, valid)
        x, routed, pregates = self._stack(False, x, tokens, token_mask, run_block)
        self._record(routed, pregates, tokens, token_mask, np.broadcast_to(
            np.arange(tokens.shape[1]), tokens.shape), 0, request_ids)
        self._forward += 1
        return pc.finish_encoder(params, x), valid

    def decode(self, tokens, cache, request_ids=None, position: int = 0):
        """One decoder pass of tokens (B, T) at the cache's index -> (logits, new cache)."""
        pc, params = self.pieces, self.params
        tokens = np.asarray(tokens)
        b, t = tokens.shape
        index = cache["index"]
        x = jax.device_put(pc.embed(params, jnp.asarray(tokens)), self.pool.sharding)
        bias = pc.bias(params, index + jnp.arange(t), jnp.arange(cache["layers"][0]["k"].shape[1]),
                       True)
        layer_caches, new = list(cache["layers"]), []

        def run_block(moe, p, p_next, x):
            j = len(new)
            out = pc.decoder_block(moe)(p, p_next, x, bias, layer_caches[j], index,
                                        cache["cross"][j], cache["enc_valid"])
            new.append(out[-1])
            return out[0] if not moe else out[:-1]
        x, routed, pregates = self._stack(True, x, tokens, np.ones((b, t), np.int32), run_block)
        self._record(routed, pregates, tokens, np.ones((b, t), np.int32),
                     np.full((b, t), position) + np.arange(t), 1, request_ids)
        self._forward += 1
        return pc.head(params, x), {**cache, "index": index + t, "layers": tuple(new)}

    def _record(self, routed, pregates, tokens, token_mask, positions, phase: int,
                request_ids) -> None:
        b = np.shape(tokens)[0]
        layers, k = self.store.layers, expert_moe(self.cfg).top_k
        pre = np.full(np.shape(tokens) + (len(layers), k), -1, np.int16)
        for li, layer in enumerate(layers):
            if layer in pregates:
                pre[:, :, li] = pregates[layer]
        self.recorder.add({"decoder": routed}, token_mask,
                          np.arange(b) if request_ids is None else np.asarray(request_ids),
                          positions, phase, pre, tokens)

    # -- generation --------------------------------------------------------------------------------
    def generate(self, tokens, token_mask, images=None, *, max_new_tokens: int,
                 sampling: Sampling = GREEDY, stop_tokens=None, return_logits: bool = False,
                 request_ids=None) -> GenerationResult:
        """Encoder pass, then decoder steps from the start token, like
        `moex.seq2seq.Seq2SeqGenerator` (`images`: the decoder engine's signature; None)."""
        cfg = self.cfg
        if images is not None:
            raise ValueError(f"{cfg.name} is a text encoder-decoder; it takes no images")
        tokens, token_mask = check_inputs(cfg, tokens, token_mask, max_new_tokens)
        b = tokens.shape[0]
        stop = stop_ids(cfg, stop_tokens)
        start = time.perf_counter()
        cross, valid = self.encode(tokens, token_mask, request_ids)
        cache = init_cache(cfg, b, max_new_tokens, cross, valid, self.dtype)
        last = np.full((b, 1), cfg.decoder_start_token_id, np.int32)
        logits, cache = self.decode(last, cache, request_ids, 0)
        out, all_logits = self._decode_loop(
            start, logits, cache,
            lambda nxt, cache, i: self.decode(nxt[:, None], cache, request_ids, i),
            max_new_tokens, sampling, stop)
        return result(cfg, out, stop, max_new_tokens, all_logits if return_logits else None)


def seq2seq_reference_run(cfg: EncDecConfig, store: ExpertStore, tokens, token_mask, *,
                          new_tokens: int, request_ids=None) -> Seq2SeqOffloadEngine:
    """The all-resident engine after one greedy generate (no stop token): its `trace()` is the
    requests' routing (the oracle forecaster's source) and its `timings` the baseline's."""
    engine = Seq2SeqOffloadEngine(cfg, None, "all-resident", store.total_bytes, store=store)
    engine.generate(tokens, token_mask, max_new_tokens=new_tokens, stop_tokens=(),
                    request_ids=request_ids)
    return engine


def engine_class(cfg):
    """The offload engine of a config: the decoder engine, or this one for an encoder-decoder."""
    return Seq2SeqOffloadEngine if isinstance(cfg, EncDecConfig) else OffloadEngine


def reference_for(cfg, store: ExpertStore, tokens, token_mask, images=None, *, new_tokens: int,
                  request_ids=None):
    """`moex.offload.forecast.reference_run` for any config."""
    if isinstance(cfg, EncDecConfig):
        return seq2seq_reference_run(cfg, store, tokens, token_mask, new_tokens=new_tokens,
                                     request_ids=request_ids)
    return reference_run(cfg, store, tokens, token_mask, images, new_tokens=new_tokens,
                         request_ids=request_ids)
