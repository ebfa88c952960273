"""FLOPs and bytes of one prefill or one decode step, piece by piece, from shapes alone.

Shape letters: B rows (requests), T prompt tokens per row (image tokens included), S keys in
the KV cache, D model width, H query heads, Kv key/value heads, Dh head width, E experts,
K experts per token, F expert width, N vision tokens per image, P Soft MoE slots per expert,
n = tokens through a piece.

    pieces(cfg, "prefill", batch=8, seq=1024)            # -> [Piece], one per layer and part
    pieces(cfg, "decode", batch=8, seq=1024, routing=TraceRouting(trace))

What is counted is what moex computes (moex.nn), so the counts predict moex's own run:
  embed            the token-embedding gather (bytes only)
  attention        the q, k, v, o projections (parameter counts from the model's own shapes,
                   so MLA and biases are counted exactly): 2 n |W| FLOPs
  attention core   scores and weighted values: 2 (Dk + Dv) FLOPs per query-key pair and head;
                   prefill skips the causal upper triangle in blocks of CAUSAL_CHUNK query
                   rows (moex.nn.attention.attend), decode reads the whole cache buffer;
                   `scores` = softmax elements (their memory traffic on a GPU, their
                   throughput on a CPU: moex.perf.model)
  kv cache         decode: B S (Kv Dk + Kv Dv) cache bytes read; prefill: the new entries written
  norms            the two norms and residual adds of a layer (10 activation passes)
  ffn              a dense MLP; `router`, `routed experts`, `shared experts` of hard MoE;
                   `soft experts` of the causal soft decoder (every expert on every token)
  routed experts   by the route moex takes at these shapes (`moex.nn.experts.resolve_compute`):
                   on a GPU sorted pairs through a grouped GEMM -- 2 n K |W_e| FLOPs and the
                   weights of the distinct experts touched (`routing.distinct(n)`); on the CPU
                   kernel gathered pairs (each pair reads its expert), broadcast (every expert
                   on every token) or blocked windows (rows padded to a multiple of 32 per
                   expert, weights read once per window)
  lm head          final norm + vocabulary projection of the last position per row
  vision *         the tower (prefill only): patch embedding, attention (all N x N pairs),
                   MLP / hard MoE / Soft MoE (slot logits, dispatch and combine einsums,
                   experts on their P slots per image), norms
  projector        its MLP on the image tokens (and Qwen3-VL's DeepStack mergers)
Activation bytes count each matmul's inputs and outputs once (the roofline's minimum traffic).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from moex.config import MoEConfig, VLMConfig
from moex.model import abstract_params
from moex.nn import grouped
from moex.nn.attention import CAUSAL_CHUNK
from moex.nn.decoder import cache_entry_shapes
from moex.nn.experts import resolve_compute
from moex.perf.routing import UniformRouting

PHASES = ("prefill", "decode")
NORM_PASSES = 10          # activation passes of a layer's norms and residual adds


@dataclasses.dataclass(frozen=True)
class Piece:
    name: str
    part: str = "decoder"          # decoder | vision | projector
    layer: int = -1
    flops: float = 0.0
    weight_bytes: float = 0.0      # parameters read
    act_bytes: float = 0.0         # activations / KV cache read or written
    rows: float = 1.0              # GEMM rows (M) of the piece's matmuls
    scores: float = 0.0            # softmax elements
    keys: float = 0.0              # keys per softmax row (the longest)
    ops: int = 0                   # kernels launched
    link_bytes: float = 0.0        # host -> device bytes (offloaded experts)
    copies: int = 0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes


def itemsize(dtype: str) -> int:
    return np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize


# -- parameter shapes ---------------------------------------------------------------------------

def _path(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


@functools.lru_cache(maxsize=32)
def layer_shapes(cfg: VLMConfig) -> dict:
    """{(part, layer): {sub-path tuple: shape}} for every layer of the tower and the decoder,
    plus (part, -1) for what is outside the layers (embeddings, heads, the projector)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        parts = _path(path)
        layer = next((int(p.split("_")[1]) for p in parts if p.startswith("layer_")), -1)
        rest = parts[2:] if layer >= 0 else parts[1:]
        out.setdefault((parts[0], layer), {})[rest] = tuple(leaf.shape)
    return out


def _in_out(name: str, shape: tuple) -> tuple[int, int]:
    """(input width, output width) of one weight leaf: the attention output projection
    (H, Dh, D) reads H Dh; every other weight (D_in, ...) reads its first axis."""
    if name == "o":
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def _matmuls(shapes: dict, prefix: str) -> tuple[int, int, int]:
    """(weight count, summed input widths, summed output widths) of the matrices (ndim >= 2)
    under `prefix`."""
    params = ins = outs = 0
    for sub, shape in shapes.items():
        if sub[0] == prefix and len(shape) >= 2 and sub[-1] not in ("slots",):
            params += math.prod(shape)
            i, o = _in_out(sub[-1], shape)
            ins, outs = ins + i, outs + o
    return params, ins, outs


def _expert_params(shapes: dict, prefix: tuple) -> tuple[int, int, int]:
    """(E, weights per expert, matrices per expert) of the stacked experts under prefix (their
    w_* matrices; bias FLOPs and bytes are negligible)."""
    leaves = {k: v for k, v in shapes.items()
              if k[:len(prefix)] == prefix and k[-1].startswith("w_")}     # biases aside
    e = leaves[prefix + ("w_down",)][0]
    per = sum(math.prod(v) for v in leaves.values()) // e
    return e, per, len(leaves)


# -- one layer's pieces -------------------------------------------------------------------------

def _dense(name, part, layer, shapes, prefix, n, pb, ab, ops=4) -> Piece:
    w, ins, outs = _matmuls(shapes, prefix)
    return Piece(name, part, layer, flops=2.0 * n * w, weight_bytes=w * pb,
                 act_bytes=n * (ins + outs) * ab, rows=n, ops=ops)


def causal_pairs(q_len: int, kv_len: int, chunked: bool) -> float:
    """Query-key pairs per head and row that moex's attention computes."""
    if not chunked or q_len <= CAUSAL_CHUNK:
        return float(q_len * kv_len)
    return float(sum(min(CAUSAL_CHUNK, q_len - a) * min(a + CAUSAL_CHUNK, kv_len)
                     for a in range(0, q_len, CAUSAL_CHUNK)))


def attention_core(name, part, layer, batch, q_len, kv_len, heads, kv_heads, dk, dv,
                    chunked) -> Piece:
    pairs = causal_pairs(q_len, kv_len, chunked)
    chunks = math.ceil(q_len / CAUSAL_CHUNK) if chunked and q_len > CAUSAL_CHUNK else 1
    group = heads // kv_heads
    rows = group * min(q_len, CAUSAL_CHUNK if chunked else q_len)
    act = batch * (q_len * heads * (dk + dv) + kv_len * kv_heads * (dk + dv)) * 4
    return Piece(name, part, layer, flops=2.0 * batch * heads * pairs * (dk + dv),
                 act_bytes=act, rows=rows, scores=batch * heads * pairs, keys=kv_len,
                 ops=5 * chunks)


def _blocked_rows(rows: np.ndarray, total: int) -> tuple[float, float]:
    """(padded rows, windows) of the blocked grouped kernel for these rows per expert."""
    big, step = grouped.BIG_ROWS, grouped.TAIL_STEP
    top = min(big, max(total, 1))
    padded = windows = 0.0
    for r in rows:
        full, rest = divmod(float(r), big)
        tail = min(top, math.ceil(rest / step) * step) if rest > 0 else 0
        padded += full * big + tail
        windows += full + (tail > 0)
    return padded, windows


def routed_experts(moe: MoEConfig, shapes: dict, prefix: tuple, part: str, layer: int,
                   n: int, d: int, pb: int, ab: int, routing, backend: str) -> Piece:
    """The routed-expert piece of a hard-MoE layer over n tokens (see the module docstring)."""
    e, per, mats = _expert_params(shapes, prefix)
    k = moe.top_k
    pairs = n * k
    kernel = "blocked" if backend == "cpu" else "ragged_dot"
    how = resolve_compute(moe.compute if moe.compute != "dense" else "auto", n, k, e, kernel)
    width = per / (d * mats) if mats else 0           # F (hidden width per matrix)
    act = lambda rows: rows * (d + width * mats + d) * ab
    if how == "gather":
        return Piece("routed experts", part, layer, flops=2.0 * pairs * per,
                     weight_bytes=pairs * per * pb, act_bytes=act(pairs), rows=1, ops=6)
    if how == "broadcast":
        return Piece("routed experts", part, layer, flops=2.0 * n * e * per,
                     weight_bytes=e * per * pb, act_bytes=act(n * e), rows=n, ops=6)
    rows = routing.rows(n)
    distinct = routing.distinct(n)
    if kernel == "blocked":
        padded, windows = _blocked_rows(rows, pairs)
        return Piece("routed experts", part, layer, flops=2.0 * padded * per,
                     weight_bytes=windows * per * pb, act_bytes=act(padded),
                     rows=padded / max(windows, 1), ops=int(8 + 4 * windows))
    return Piece("routed experts", part, layer, flops=2.0 * pairs * per,
                 weight_bytes=distinct * per * pb, act_bytes=act(pairs),
                 rows=pairs / max(distinct, 1), ops=10)


def _ffn(moe: MoEConfig, shapes, part, layer, n, d, pb, ab, routing, backend,
         causal: bool, groups: int) -> list[Piece]:
    name = {"vision": "vision ", "projector": "projector "}.get(part, "")
    if not moe.is_moe_layer(layer if part != "projector" else 0):
        return [_dense(f"{name}ffn" if part != "projector" else "projector", part, layer,
                       shapes, "ffn", n, pb, ab)]
    router = shapes.get(("ffn", "router", "kernel")) or shapes.get(("ffn", "router"))
    e = moe.num_experts
    if moe.kind == "hard":
        out = [Piece(f"{name}router", part, layer, flops=2.0 * n * d * e,
                     weight_bytes=math.prod(router) * pb, act_bytes=n * (d + e) * ab, rows=n,
                     ops=4),
               routed_experts(moe, shapes, ("ffn", "experts"), part, layer, n, d, pb, ab,
                              routing, backend)]
        if moe.num_shared_experts:
            shared = {k[1:]: v for k, v in shapes.items() if k[:2] == ("ffn", "shared_experts")}
            out.append(_dense(f"{name}shared experts", part, layer, shared, "shared_experts",
                              n, pb, ab))
        return out
    e, per, mats = _expert_params(shapes, ("ffn", "experts"))
    if causal:                                  # per-token soft gating: every expert, every token
        width = per / (d * mats)
        return [Piece(f"{name}router", part, layer, flops=2.0 * n * d * e,
                      weight_bytes=math.prod(router) * pb, act_bytes=n * (d + e) * ab, rows=n,
                      ops=3),
                Piece(f"{name}soft experts", part, layer, flops=2.0 * n * e * per,
                      weight_bytes=e * per * pb, act_bytes=n * (2 * d + e * width * mats) * ab,
                      rows=n, ops=5)]
    p = moe.soft_slots                          # Soft MoE over groups of tokens
    m = n // groups
    slots = groups * e * p
    logits = 2.0 * n * d * e * p
    mix = 2.0 * 2 * n * e * p * d              # dispatch and combine einsums
    width = per / (d * mats)
    return [Piece(f"{name}soft moe mixing", part, layer, flops=logits + mix,
                  weight_bytes=d * e * p * pb, act_bytes=(2 * n * d + 2 * n * e * p) * 4,
                  rows=m, scores=2.0 * n * e * p, keys=max(m, e * p), ops=8),
            Piece(f"{name}soft experts", part, layer, flops=2.0 * slots * per,
                  weight_bytes=e * per * pb, act_bytes=slots * (2 * d + width * mats) * ab,
                  rows=groups * p, ops=4)]


# -- the whole step -----------------------------------------------------------------------------

def _decoder(cfg: VLMConfig, phase: str, batch: int, seq: int, routing, backend) -> list[Piece]:
    c, shapes_all = cfg.decoder, layer_shapes(cfg)
    pb, ab = itemsize(cfg.param_dtype), itemsize(cfg.dtype)
    q_len = seq if phase == "prefill" else 1
    n = batch * q_len
    (kh, kd), (vh, vd) = cache_entry_shapes(c)
    dk = c.dim_per_head if c.attention != "mla" else c.qk_nope_head_dim + c.qk_rope_head_dim
    dv = c.dim_per_head if c.attention != "mla" else c.v_head_dim
    d = c.d_model
    routing = routing or UniformRouting(max(c.moe.num_experts, 1), c.moe.top_k)
    top = shapes_all[("decoder", -1)]
    out = [Piece("embed", "decoder", -1, act_bytes=n * d * (pb + ab), ops=1)]
    for i in range(c.num_layers):
        shapes = shapes_all[("decoder", i)]
        out.append(_dense("attention", "decoder", i, shapes, "attn", n, pb, ab,
                          ops=6 + 2 * (c.qk_norm != "none")))
        out.append(attention_core("attention core", "decoder", i, batch, q_len, seq,
                                   c.num_heads, c.num_kv_heads if c.attention != "mla"
                                   else c.num_heads, dk, dv, chunked=phase == "prefill"))
        kv = (kh * kd + vh * vd) * ab
        out.append(Piece("kv cache", "decoder", i,
                         act_bytes=batch * (seq if phase == "decode" else q_len) * kv, ops=2))
        out.append(Piece("norms", "decoder", i, act_bytes=NORM_PASSES * n * d * ab, ops=6))
        out += _ffn(c.moe, shapes, "decoder", i, n, d, pb, ab, routing, backend, True, batch)
    head = top.get(("lm_head", "kernel")) or top[("embed",)]
    out.append(Piece("lm head", "decoder", -1, flops=2.0 * batch * math.prod(head),
                     weight_bytes=math.prod(head) * pb,
                     act_bytes=batch * (d + c.vocab_size) * ab + batch * c.vocab_size * 4,
                     rows=batch, ops=4))
    return out


def _vision(cfg: VLMConfig, batch: int, backend) -> list[Piece]:
    v, shapes_all = cfg.vision, layer_shapes(cfg)
    pb, ab = itemsize(cfg.param_dtype), itemsize(cfg.dtype)
    tokens = v.num_patches + v.class_token
    n, d = batch * tokens, v.d_model
    top = shapes_all[("vision", -1)]
    patch = top[("patch_embed", "kernel")]
    out = [Piece("vision patch embed", "vision", -1, flops=2.0 * batch * v.num_patches
                 * math.prod(patch), weight_bytes=math.prod(patch) * pb,
                 act_bytes=batch * v.num_patches * (patch[0] + d) * ab, rows=n, ops=3)]
    routing = UniformRouting(max(v.moe.num_experts, 1), v.moe.top_k)
    for i in range(v.num_layers + v.feature_layer + 1):
        shapes = shapes_all[("vision", i)]
        h = v.num_heads
        out.append(_dense("vision attention", "vision", i, shapes, "attn", n, pb, ab, ops=4))
        out.append(attention_core("vision attention core", "vision", i, batch, tokens, tokens,
                                   h, h, d // h, d // h, chunked=False))
        out.append(Piece("vision norms", "vision", i, act_bytes=NORM_PASSES * n * d * ab, ops=6))
        out += _ffn(v.moe, shapes, "vision", i, n, d, pb, ab, routing, backend, False, batch)
    m = batch * v.num_image_tokens
    proj = shapes_all[("projector", -1)]
    p = cfg.projector
    if p.moe.kind == "dense":
        out.append(_dense("projector", "projector", -1,
                          {("ffn",) + k: s for k, s in proj.items()}, "ffn", m, pb, ab))
    else:
        pr = UniformRouting(max(p.moe.num_experts, 1), p.moe.top_k)
        out += _ffn(p.moe, proj, "projector", 0, m,
                    d * v.spatial_merge ** 2, pb, ab, pr, backend, False, batch)
    for j in range(len(v.deepstack_layers)):   # Qwen3-VL's DeepStack mergers: projector MLPs
        mlp = {("ffn",) + k[1:]: s for k, s in shapes_all[(f"deepstack_{j}", -1)].items()
               if k[0] == "mlp"}
        out.append(_dense("projector deepstack", "projector", -1, mlp, "ffn", m, pb, ab))
    return out


def pieces(cfg: VLMConfig, phase: str, batch: int, seq: int, routing=None,
           backend: str = "gpu", images: bool = True) -> list[Piece]:
    """Every piece of one prefill (B rows of T = seq tokens, one image each when the model has
    a tower and `images`) or one decode step (B tokens over a cache of seq entries).
    routing: the decoder's routing model (moex.perf.routing; default uniform); backend: "gpu"
    (grouped GEMM) or "cpu" (moex's blocked CPU kernel), which decides the expert route."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, found {phase!r}")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, found {batch} and {seq}")
    out = []
    if phase == "prefill" and images and cfg.vision is not None:
        out += _vision(cfg, batch, backend)
    return out + _decoder(cfg, phase, batch, seq, routing, backend)


def totals(ps: list[Piece]) -> dict:
    return {"flops": sum(p.flops for p in ps), "weight_bytes": sum(p.weight_bytes for p in ps),
            "act_bytes": sum(p.act_bytes for p in ps), "scores": sum(p.scores for p in ps),
            "ops": sum(p.ops for p in ps), "link_bytes": sum(p.link_bytes for p in ps)}
