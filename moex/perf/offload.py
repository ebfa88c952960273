"""Expert offloading projected onto real hardware: the replay simulator (moex.offload.simulator)
with its compute and copy times taken from the performance model.

    compute, transfer = sim_models(cfg, get_hardware("h200"), context=1024)
    simulate(trace, "lru", slots, batch, expert_bytes(cfg), transfer, compute)

`ModelCompute.visit_seconds(n)`: one MoE-layer visit of a forward with n tokens = the model's
predicted decode step at batch n (all pieces: attention, KV reads, experts from device memory,
the LM head) divided by the number of MoE layers. `TransferModel` gets the hardware's link
bandwidth and per-copy latency.

Traces of larger models: routing is recorded on the trained models moex has (4-8 experts, top-2,
4-8 MoE layers) and mapped onto the target's shape by `map_trace`, which keeps the recorded
statistics -- which experts are popular, how often a token repeats its predecessor's experts,
how well the pre-gate predicts:
  layers   target MoE layer j replays source MoE layer j mod L_src;
  experts  each source expert e owns the block of m = E_tgt / E_src target experts
           [e m, (e + 1) m); a token's source choice e becomes r = K_tgt / K_src experts of
           its block, the contiguous offsets (h + i) mod m, i < r, where h is a fixed hash of
           (target layer, e, the token's experts at the previous source MoE layer) -- so two
           tokens that took the same path take the same target experts, and the spread inside
           a block follows the path, as fine-grained experts specialise;
  pregate  a recorded pre-gate prediction maps by the same rule (its previous layer is known
           when it is made), so a right source guess is a right target guess; at the wrap
           (j mod L_src = 0) there is none.
E_tgt must be a multiple of E_src and K_tgt of K_src, with r <= m. A soft decoder (every expert
on every token) gets `dense_trace`: every token needs every expert of every MoE layer.

Moving fewer bytes (`miss_costs`): a store of int8 / int4 experts moves `stored_expert_bytes`
per load (`moex.offload.quant.stored_size`); a low-precision miss moves its low copy; a
host-computed miss costs, on the hardware's host, reading the expert's weights once from host
DRAM (bytes / host memory bandwidth) plus two activation copies' latency, then per row its
FLOPs at the host's rate (2 x D x F per matrix). Those are the `MissCosts` of the replay
simulator's `MissRule`. Quantized slots (a budget holding expert_bytes / stored bytes times more
experts) pay `dequant_seconds` per expert a visit uses: reading the stored copy and writing and
reading back the dequantized weights in device memory (an unfused dequantize, as moex's piece
runs it).
"""

from __future__ import annotations

import dataclasses
import numpy as np

from moex.config import VLMConfig
from moex.offload import quant
from moex.offload.misses import MissCosts, MissRule, MissSpec
from moex.offload.simulator import TransferModel
from moex.offload.trace import Trace
from moex.perf.counts import itemsize
from moex.perf.hardware import Hardware
from moex.perf.model import predict
from moex.perf.routing import TraceRouting, UniformRouting

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _hash(*cols) -> np.ndarray:
    """A fixed integer hash of equal-length integer columns (splitmix-style)."""
    h = np.zeros(len(cols[0]), np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            h = (h ^ (np.asarray(c).astype(np.int64).astype(np.uint64) + _MIX)) * np.uint64(
                0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
    return h


def _path_key(experts: np.ndarray) -> np.ndarray:
    """(N, K) expert ids -> (N,) one integer per sorted expert set."""
    s = np.sort(experts.astype(np.int64), axis=1)
    key = np.zeros(len(s), np.int64)
    for col in s.T:
        key = key * 1009 + col + 1
    return key


def _expand(src: np.ndarray, prev_key: np.ndarray, layer: int, m: int, r: int) -> np.ndarray:
    """(N, K_src) source choices (-1: none) -> (N, K_src * r) target experts."""
    n, k = src.shape
    out = np.full((n, k * r), -1, np.int32)
    for c in range(k):
        e = src[:, c].astype(np.int64)
        h = (_hash(np.full(n, layer), e, prev_key) % np.uint64(m)).astype(np.int64)
        for i in range(r):
            out[:, c * r + i] = np.where(e >= 0, e * m + (h + i) % m, -1)
    return out


def map_trace(trace: Trace, num_experts: int, top_k: int, num_moe_layers: int,
              layers: list[int] | None = None, model: str | None = None) -> Trace:
    """The trace replayed on a model with `num_moe_layers` MoE layers of `num_experts` experts,
    top-`top_k` (see the module docstring)."""
    es, ks, ls = trace.num_experts, trace.top_k, len(trace.moe_layers)
    if num_experts % es or top_k % ks or top_k // ks > num_experts // es:
        raise ValueError(f"cannot map a trace of {es} experts top-{ks} onto {num_experts} "
                         f"experts top-{top_k}: the expert count must be a multiple of "
                         f"{es} and top-k a multiple of {ks}, with top_k/{ks} <= "
                         f"experts/{es}")
    m, r = num_experts // es, top_k // ks
    n = len(trace)
    experts = np.zeros((n, num_moe_layers, top_k), np.int32)
    pregate = None if trace.pregate is None else np.full((n, num_moe_layers, top_k), -1,
                                                         np.int32)
    probs = np.zeros((n, num_moe_layers, num_experts), np.float16)
    for j in range(num_moe_layers):
        s = j % ls
        prev = _path_key(trace.experts[:, s - 1]) if s else _path_key(trace.experts[:, s])
        experts[:, j] = _expand(trace.experts[:, s], prev, j, m, r)
        if pregate is not None and s:
            pregate[:, j] = _expand(trace.pregate[:, s], prev, j, m, r)
        probs[:, j] = np.repeat(trace.probs[:, s].astype(np.float32) / m, m, axis=1)
    return Trace(model=model or f"{trace.model}->{num_experts}x{top_k}",
                 moe_layers=list(layers) if layers is not None else list(range(num_moe_layers)),
                 num_experts=num_experts, top_k=top_k, request=trace.request,
                 position=trace.position, phase=trace.phase, experts=experts, probs=probs,
                 forward=trace.forward, pregate=pregate, token=trace.token, domain=trace.domain,
                 request_labels=trace.request_labels)


def expert_layers(cfg: VLMConfig) -> list[int]:
    """Decoder layers with experts, hard or soft (moex.offload.store.moe_layers: hard only)."""
    moe = cfg.decoder.moe
    return [i for i in range(cfg.decoder.num_layers) if moe.is_moe_layer(i)]


def trace_for(cfg: VLMConfig, source: Trace) -> Trace:
    """`source` mapped onto cfg's decoder MoE shape (unchanged when it already matches), or for
    a soft decoder the every-expert trace over the same tokens."""
    moe, layers = cfg.decoder.moe, expert_layers(cfg)
    if moe.kind == "soft":
        return dense_trace(source, moe.num_experts, layers, cfg.name)
    if (source.num_experts, source.top_k, source.moe_layers) == (moe.num_experts, moe.top_k,
                                                                 layers):
        return source
    return map_trace(source, moe.num_experts, moe.top_k, len(layers), layers,
                     f"{source.model}->{cfg.name}")


def dense_trace(source: Trace, num_experts: int, layers: list[int], model: str) -> Trace:
    """Every token through every expert of every MoE layer (soft gating), on source's tokens."""
    n = len(source)
    experts = np.broadcast_to(np.arange(num_experts, dtype=np.int32),
                              (n, len(layers), num_experts)).copy()
    probs = np.full((n, len(layers), num_experts), 1.0 / num_experts, np.float16)
    return Trace(model=model, moe_layers=list(layers), num_experts=num_experts,
                 top_k=num_experts, request=source.request, position=source.position,
                 phase=source.phase, experts=experts, probs=probs, forward=source.forward,
                 token=source.token, domain=source.domain)


def decode_only(trace: Trace) -> Trace:
    """The generated tokens' rows (decode steps) of a trace."""
    keep = trace.phase == 1
    if not keep.any():
        raise ValueError(f"trace of {trace.model} has no generated (decode) tokens")
    pick = lambda a: None if a is None else a[keep]
    return dataclasses.replace(trace, request=trace.request[keep],
                               position=trace.position[keep], phase=trace.phase[keep],
                               experts=trace.experts[keep], probs=trace.probs[keep],
                               forward=trace.forward[keep], pregate=pick(trace.pregate),
                               token=pick(trace.token), hidden=None, hidden_pre=None)


def expert_shapes(cfg: VLMConfig) -> dict:
    """{weight: shape} of one decoder expert (the offload store's matrices)."""
    d, f = cfg.decoder.d_model, cfg.decoder.moe.expert_dim
    gated = {"w_gate": (d, f)} if cfg.decoder.activation == "swiglu" else {}
    return {**gated, "w_up": (d, f), "w_down": (f, d)}


def expert_bytes(cfg: VLMConfig) -> int:
    """Bytes of one decoder expert at the parameter dtype."""
    return stored_expert_bytes(cfg, None)


def stored_expert_bytes(cfg: VLMConfig, fmt) -> int:
    """Bytes one load of an expert moves from a store in `fmt` (None: the parameter dtype)."""
    return quant.stored_size(expert_shapes(cfg), quant.parse_expert_dtype(fmt),
                             itemsize(cfg.param_dtype))


def miss_costs(cfg: VLMConfig, hw: Hardware, fmt=None, low=None) -> MissCosts:
    """The miss cost model of `cfg`'s experts on `hw` (see the module docstring): a store in
    `fmt`, a low-precision copy in `low`."""
    flops_per_row = 2 * sum(int(np.prod(s)) for s in expert_shapes(cfg).values())
    weights = expert_bytes(cfg)
    return MissCosts(link_bytes_per_s=hw.link_bandwidth, link_latency_s=hw.link_latency,
                     host_seconds_per_row=flops_per_row / hw.host_flops,
                     host_overhead_s=weights / hw.host_memory_bandwidth + 2 * hw.link_latency,
                     stored_bytes=stored_expert_bytes(cfg, fmt),
                     low_bytes=stored_expert_bytes(cfg, low) if low is not None else 0)


def dequant_seconds(cfg: VLMConfig, hw: Hardware, fmt) -> float:
    """Device time to dequantize one expert stored in `fmt` (0 for None)."""
    if quant.parse_expert_dtype(fmt) is None:
        return 0.0
    return (stored_expert_bytes(cfg, fmt) + 2 * expert_bytes(cfg)) / hw.memory_bandwidth


def miss_rule(cfg: VLMConfig, hw: Hardware, fmt, misses: MissSpec) -> MissRule | None:
    """The simulator's MissRule for a store in `fmt` with miss options `misses` (None when
    every miss loads the stored copy)."""
    if misses.plain:
        return None
    return MissRule(misses, miss_costs(cfg, hw, fmt, misses.low))


class ModelCompute:
    """ComputeModel of the simulator from the performance model (see the module docstring)."""

    def __init__(self, cfg: VLMConfig, hw: Hardware, context: int, routing=None):
        self.cfg, self.hw, self.context, self.routing = cfg, hw, context, routing
        self.layers = max(len(expert_layers(cfg)), 1)
        self._steps: dict = {}

    def step_seconds(self, tokens: int) -> float:
        tokens = max(int(tokens), 1)
        if tokens not in self._steps:
            self._steps[tokens] = predict(self.cfg, self.hw, "decode", tokens, self.context,
                                          self.routing).seconds
        return self._steps[tokens]

    def visit_seconds(self, tokens: int) -> float:
        return self.step_seconds(tokens) / self.layers


def sim_models(cfg: VLMConfig, hw: Hardware, context: int, trace: Trace | None = None):
    """(ModelCompute, TransferModel) for replaying `cfg`'s trace on `hw`."""
    moe = cfg.decoder.moe
    routing = (TraceRouting(trace) if trace is not None and moe.kind == "hard"
               else UniformRouting(max(moe.num_experts, 1), moe.top_k))
    return (ModelCompute(cfg, hw, context, routing),
            TransferModel(bandwidth_bytes_per_s=hw.link_bandwidth, latency_s=hw.link_latency))
