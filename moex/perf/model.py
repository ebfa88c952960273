"""The performance model: piece counts (moex.perf.counts) on a hardware spec -> time per piece,
its bound, the step's time and tokens/s, and the memory the step needs.

    p = predict(get_config("mixtral-8x7b"), get_hardware("h200"), "decode", batch=8, seq=2048)
    print(roofline_table(p)); p.seconds; p.tokens_per_s

Time of one piece (a hierarchical roofline, as MoE-Lightning's):
  compute   flops / (peak(dtype) * M / (M + rows_half))       M = the piece's GEMM rows
  memory    (weight + activation bytes [+ SCORE_BYTES per softmax element where the hardware
            has no measured softmax rate]) / memory bandwidth
  softmax   softmax elements / the calibrated rate at the piece's key length (CPUs)
  link      host -> device bytes / link bandwidth + latency per copy (offloaded experts)
  overhead  kernels * op_overhead
  time      max(compute, memory + softmax, link) + overhead    where compute and memory overlap
            (GPUs); their sum + overhead otherwise (CPUs: measured to add, moex.perf.calibrate)
The bound of a piece is its largest term; the step's bound is the one that holds the most time.
"""

from __future__ import annotations

import dataclasses
import functools

from moex.config import VLMConfig
from moex.info import model_info
from moex.nn.attention import CAUSAL_CHUNK
from moex.nn.decoder import kv_bytes_per_token
from moex.perf.counts import Piece, itemsize, pieces
from moex.perf.hardware import Hardware

SCORE_BYTES = 16        # fp32 scores written, read by the softmax, probabilities written, read
BOUNDS = ("compute", "memory", "link", "overhead")


@dataclasses.dataclass(frozen=True)
class PieceTime:
    piece: Piece
    compute: float
    memory: float
    link: float
    overhead: float
    seconds: float

    @property
    def bound(self) -> str:
        terms = dict(zip(BOUNDS, (self.compute, self.memory, self.link, self.overhead)))
        return max(terms, key=terms.get)


def piece_time(p: Piece, hw: Hardware, dtype: str) -> PieceTime:
    compute = hw.matmul_seconds(p.flops, p.rows, dtype)
    score_bytes = 0.0 if hw.softmax_rates else p.scores * SCORE_BYTES
    memory = hw.memory_seconds(p.bytes + score_bytes)
    if hw.softmax_rates:
        memory += hw.softmax_seconds(p.scores, p.keys)
    link = hw.link_seconds(p.link_bytes, p.copies)
    overhead = p.ops * hw.op_overhead
    body = max(compute, memory, link) if hw.overlap else compute + memory + link
    return PieceTime(p, compute, memory, link, overhead, body + overhead)


@dataclasses.dataclass
class Prediction:
    model: str
    hardware: str
    phase: str
    batch: int
    seq: int
    times: list

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.times)

    @property
    def tokens_per_s(self) -> float:
        tokens = self.batch * (self.seq if self.phase == "prefill" else 1)
        return tokens / self.seconds

    def seconds_of(self, bound: str) -> float:
        return sum(t.seconds for t in self.times if t.bound == bound)

    @property
    def bound(self) -> str:
        return max(BOUNDS, key=self.seconds_of)

    def rows(self) -> list[dict]:
        """One row per piece name (summed over layers), in order of first appearance."""
        out: dict = {}
        for t in self.times:
            r = out.setdefault(t.piece.name, dict(piece=t.piece.name, layers=0, flops=0.0,
                                                  bytes=0.0, link_bytes=0.0, compute_s=0.0,
                                                  memory_s=0.0, link_s=0.0, overhead_s=0.0,
                                                  seconds=0.0))
            r["layers"] += 1
            r["flops"] += t.piece.flops
            r["bytes"] += t.piece.bytes
            r["link_bytes"] += t.piece.link_bytes
            for k in ("compute", "memory", "link", "overhead"):
                r[f"{k}_s"] += getattr(t, k)
            r["seconds"] += t.seconds
        for r in out.values():
            r["bound"] = max(BOUNDS, key=lambda b: r[f"{b}_s"])
        return list(out.values())

    def as_dict(self) -> dict:
        return dict(model=self.model, hardware=self.hardware, phase=self.phase,
                    batch=self.batch, seq=self.seq, seconds=self.seconds,
                    tokens_per_s=self.tokens_per_s, bound=self.bound, pieces=self.rows())


def default_backend(hw: Hardware) -> str:
    return "cpu" if hw.name == "cpu" else "gpu"


def offloaded(ps: list[Piece], fraction: float) -> list[Piece]:
    """The pieces with `fraction` of each routed / soft expert piece's weight bytes streamed
    from the host per step (an on-demand bound: no reuse between steps)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"offloaded fraction must be in [0, 1], found {fraction}")
    if not fraction:
        return ps
    out = []
    for p in ps:
        if p.part == "decoder" and p.name in ("routed experts", "soft experts"):
            p = dataclasses.replace(p, link_bytes=p.weight_bytes * fraction,
                                    copies=max(1, round(fraction * 8)))
        out.append(p)
    return out


def predict(cfg: VLMConfig, hw: Hardware, phase: str, batch: int, seq: int, routing=None,
            backend: str | None = None, offload: float = 0.0, images: bool = True) -> Prediction:
    """Predicted time of one prefill (B x seq tokens, images included) or one decode step (B
    tokens over seq cached ones) of `cfg` on `hw`; `offload`: the fraction of the decoder's
    expert bytes streamed over the host link each step."""
    ps = offloaded(pieces(cfg, phase, batch, seq, routing, backend or default_backend(hw),
                          images), offload)
    return Prediction(cfg.name, hw.name, phase, batch, seq,
                      [piece_time(p, hw, cfg.dtype) for p in ps])


def memory_bytes(cfg: VLMConfig, batch: int, seq: int, offload: float = 0.0) -> dict:
    """Device memory of serving B rows of seq tokens: weights (less the offloaded share of the
    routed experts), the KV cache, and the largest transient of the prefill (an estimate:
    the fp32 scores of one block of CAUSAL_CHUNK queries over all keys, or the FFN hidden
    activations, or the logits)."""
    info = cached_info(cfg)
    experts = info.routed_expert_params * itemsize(cfg.param_dtype)
    weights = info.total_params * itemsize(cfg.param_dtype) - experts * offload
    kv = batch * seq * kv_bytes_per_token(cfg.decoder, itemsize(cfg.dtype))
    c = cfg.decoder
    ab = itemsize(cfg.dtype)
    scores = batch * c.num_heads * min(seq, CAUSAL_CHUNK) * seq * 4    # one query block's
    hidden = batch * seq * max(c.ffn_dim, c.moe.expert_dim * max(c.moe.num_experts, 1)
                               if c.moe.kind == "soft" else c.ffn_dim) * 2 * ab
    transient = max(scores, hidden, batch * c.vocab_size * 4)
    return dict(weights=weights, kv_cache=kv, transient=transient,
                total=weights + kv + transient)


@functools.lru_cache(maxsize=32)
def cached_info(cfg: VLMConfig):
    """moex.info.model_info, once per config (it traces the model's shapes)."""
    return model_info(cfg)


def _fmt(x: float, unit: str) -> str:
    for scale, pre in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {pre}{unit}"
    return f"{x:.0f} {unit}"


def roofline_table(p: Prediction) -> str:
    """Markdown: time per piece, FLOPs, bytes, each term and the bound that holds."""
    lines = [f"**{p.model}** on **{p.hardware}**, {p.phase}, B={p.batch}, "
             f"{'T' if p.phase == 'prefill' else 'context'}={p.seq}: "
             f"{p.seconds * 1e3:.3f} ms, {p.tokens_per_s:,.0f} tokens/s, {p.bound}-bound",
             "", "| piece | layers | FLOPs | bytes | link bytes | compute ms | memory ms "
                 "| link ms | overhead ms | time ms | share | bound |",
             "|" + "---|" * 12]
    total = p.seconds
    for r in p.rows():
        lines.append(f"| {r['piece']} | {r['layers']} | {_fmt(r['flops'], 'FLOP')} "
                     f"| {_fmt(r['bytes'], 'B')} | {_fmt(r['link_bytes'], 'B')} "
                     f"| {r['compute_s'] * 1e3:.3f} | {r['memory_s'] * 1e3:.3f} "
                     f"| {r['link_s'] * 1e3:.3f} | {r['overhead_s'] * 1e3:.3f} "
                     f"| {r['seconds'] * 1e3:.3f} | {100 * r['seconds'] / total:.1f}% "
                     f"| {r['bound']} |")
    return "\n".join(lines)
