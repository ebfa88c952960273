"""FLOP and byte counts of moex.perf against hand counts: one dense, one hard and one soft layer,
and the published 7B presets."""

import dataclasses

import pytest

from moex.config import DecoderConfig, MoEConfig, VisionConfig, ProjectorConfig, VLMConfig, get_config
from moex.info import model_info
from moex.perf.counts import causal_pairs, pieces, totals
from moex.perf.routing import UniformRouting

# one decoder layer: D 64, H 4 query heads, Kv 2 key/value heads, Dh 16, dense FFN 128 (swiglu),
# vocabulary 100, fp32 everywhere
DEC = DecoderConfig(vocab_size=100, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    ffn_dim=128, max_seq_len=4096)
ATTN_W = 64 * 4 * 16 + 2 * (64 * 2 * 16) + 4 * 16 * 64      # q + k + v + o = 12288


def lm(moe=MoEConfig()) -> VLMConfig:
    return VLMConfig("hand", dataclasses.replace(DEC, moe=moe)).validate()


def by_name(ps):
    return {p.name: p for p in ps}


def test_dense_layer_prefill_by_hand():
    b, t = 2, 8
    n = b * t
    p = by_name(pieces(lm(), "prefill", b, t))
    assert p["attention"].flops == 2 * n * ATTN_W
    assert p["attention"].weight_bytes == 4 * ATTN_W
    # activations: q/k/v read x (64 each) and write 64 + 32 + 32; o reads 64, writes 64
    assert p["attention"].act_bytes == 4 * n * (3 * 64 + 64 + 32 + 32 + 64 + 64)
    # T = 8 <= CAUSAL_CHUNK: one block of 8 x 8 pairs per head; QK^T and AV: 2 (16 + 16) each
    assert p["attention core"].flops == 2 * b * 4 * 64 * (16 + 16)
    assert p["attention core"].scores == b * 4 * 64
    assert p["ffn"].flops == 2 * n * 3 * 64 * 128
    assert p["ffn"].weight_bytes == 4 * 3 * 64 * 128
    # prefill writes B T entries of k and v (2 heads x 16 each) into the cache
    assert p["kv cache"].act_bytes == b * t * (2 * 16 + 2 * 16) * 4
    # LM head on the last position of each row only
    assert p["lm head"].flops == 2 * b * 64 * 100


def test_dense_layer_decode_reads_the_whole_cache():
    b, s = 3, 300
    p = by_name(pieces(lm(), "decode", b, s))
    assert p["attention"].flops == 2 * b * ATTN_W
    assert p["attention core"].flops == 2 * b * 4 * s * 32
    assert p["kv cache"].act_bytes == b * s * 64 * 4
    assert p["ffn"].flops == 2 * b * 3 * 64 * 128


def test_causal_chunks_count_the_lower_triangle_by_blocks():
    # T = 300 in blocks of 128: 128 x 128 + 128 x 256 + 44 x 300
    assert causal_pairs(300, 300, True) == 128 * 128 + 128 * 256 + 44 * 300
    assert causal_pairs(300, 300, False) == 300 * 300


HARD = MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=32)
EXPERT_W = 3 * 64 * 32                                        # up, gate, down = 6144


def test_hard_layer_gpu_route_by_hand():
    b, t = 1, 8
    n = b * t
    p = by_name(pieces(lm(HARD), "prefill", b, t, backend="gpu"))
    assert p["router"].flops == 2 * n * 64 * 4
    experts = p["routed experts"]
    assert experts.flops == 2 * n * 2 * EXPERT_W                  # K pairs per token
    distinct = 4 * (1 - (1 - 2 / 4) ** n)                         # uniform routing
    assert experts.weight_bytes == pytest.approx(distinct * EXPERT_W * 4)
    assert "ffn" not in p


def test_hard_layer_cpu_routes_follow_the_kernel():
    # decode B=1: 2 pairs, 4 * 2 > E = 4 -> broadcast: every expert on the token
    one = by_name(pieces(lm(HARD), "decode", 1, 16, backend="cpu"))["routed experts"]
    assert one.flops == 2 * 1 * 4 * EXPERT_W and one.weight_bytes == 4 * EXPERT_W * 4
    # with 16 experts a B=1 token gathers its 2 pairs: each pair reads its expert
    wide = dataclasses.replace(HARD, num_experts=16)
    g = by_name(pieces(lm(wide), "decode", 1, 16, backend="cpu"))["routed experts"]
    assert g.flops == 2 * 2 * EXPERT_W and g.weight_bytes == 2 * EXPERT_W * 4
    # 64 tokens (> 32): sorted blocked windows; 32 rows per expert -> one 32-row window each
    s = by_name(pieces(lm(HARD), "prefill", 1, 64, backend="cpu"))["routed experts"]
    assert s.flops == 2 * (4 * 32) * EXPERT_W and s.weight_bytes == 4 * EXPERT_W * 4


SOFT = MoEConfig(kind="soft", num_experts=4, expert_dim=32)


def test_soft_decoder_layer_runs_every_expert_on_every_token():
    b, t = 2, 8
    n = b * t
    p = by_name(pieces(lm(SOFT), "prefill", b, t))
    assert p["soft experts"].flops == 2 * n * 4 * EXPERT_W
    assert p["soft experts"].weight_bytes == 4 * EXPERT_W * 4
    assert p["router"].flops == 2 * n * 64 * 4


def test_soft_moe_vision_layer_by_hand():
    # one vision block: 16 patches (no class token), D 32, Soft MoE of 4 experts x 2 slots,
    # expert MLP 32 -> 64 -> 32 (gelu: 2 matrices + biases)
    vis = VisionConfig(image_size=16, patch_size=4, d_model=32, num_layers=1, num_heads=2,
                       mlp_dim=64, class_token=False, drop_class_token=False, feature_layer=-1,
                       moe=MoEConfig(kind="soft", num_experts=4, expert_dim=64, soft_slots=2))
    cfg = VLMConfig("hand-vlm", DEC, vis, ProjectorConfig(hidden_dim=32)).validate()
    b, m, d, e, slots = 3, 16, 32, 4, 2
    p = by_name(pieces(cfg, "prefill", b, 40))
    mix = p["vision soft moe mixing"]
    # logits x . mu (D x E P) plus dispatch and combine einsums (each 2 B M E P D)
    assert mix.flops == 2 * b * m * d * e * slots + 2 * 2 * b * m * e * slots * d
    assert mix.scores == 2 * b * m * e * slots                      # two softmaxes
    # each expert on its P slots of each image: B P rows through 2 x 32 x 64 weights
    assert p["vision soft experts"].flops == 2 * (b * e * slots) * (2 * d * 64)
    assert p["vision attention core"].flops == 2 * b * 2 * (m * m) * (16 + 16)


def test_totals_agree_with_model_info_on_weight_bytes():
    # a dense model reads every parameter matrix once per decode step (norm scales aside)
    cfg = get_config("llava-1.5-7b")
    tot = totals(pieces(cfg, "decode", 1, 1024, images=False))
    info = model_info(cfg)
    decoder_bytes = 2 * info.decoder_params
    emb = 2 * cfg.decoder.vocab_size * cfg.decoder.d_model       # gathered rows, not read whole
    norms = 2 * cfg.decoder.d_model * (2 * cfg.decoder.num_layers + 1)
    assert tot["weight_bytes"] == decoder_bytes - emb - norms


def test_mixtral_decode_counts_by_hand():
    # Mixtral-8x7B: 32 layers, D 4096, 32 heads / 8 KV heads of 128, experts 3 x 4096 x 14336
    cfg = get_config("mixtral-8x7b")
    p = pieces(cfg, "decode", 1, 2048, backend="gpu")
    experts = [x for x in p if x.name == "routed experts"]
    assert len(experts) == 32
    w_e = 3 * 4096 * 14336
    assert experts[0].flops == 2 * 2 * w_e                     # top-2
    assert experts[0].weight_bytes == 2 * w_e * 2               # 2 experts of 352 MB, bf16
    attn = next(x for x in p if x.name == "attention")
    assert attn.weight_bytes == 2 * (4096 * 4096 * 2 + 2 * 4096 * 1024)
    kv = next(x for x in p if x.name == "kv cache")
    assert kv.act_bytes == 2048 * 2 * 8 * 128 * 2               # K and V, 8 heads x 128, bf16
    # prefill of 1024 tokens: 2 x 1024 x 2 x w_e FLOPs of experts per layer (2 pairs / token)
    pre = [x for x in pieces(cfg, "prefill", 1, 1024) if x.name == "routed experts"]
    assert pre[0].flops == 2 * 1024 * 2 * w_e


def test_llava_prefill_counts_the_tower_and_the_projector():
    cfg = get_config("llava-1.5-7b")
    p = pieces(cfg, "prefill", 1, 1024)
    names = {x.name for x in p}
    assert {"vision patch embed", "vision attention", "vision ffn", "projector"} <= names
    # CLIP-L/14-336: 577 tokens through 23 blocks (feature layer -2), MLP 1024 -> 4096 -> 1024
    ffn = [x for x in p if x.name == "vision ffn"]
    assert len(ffn) == 23 and ffn[0].flops == 2 * 577 * 2 * 1024 * 4096
    proj = next(x for x in p if x.name == "projector")
    assert proj.flops == 2 * 576 * (1024 * 4096 + 4096 * 4096)


def test_bad_phase_and_sizes_are_refused():
    with pytest.raises(ValueError, match="phase"):
        pieces(lm(), "train", 1, 8)
    with pytest.raises(ValueError, match="batch and seq"):
        pieces(lm(), "decode", 0, 8)


def test_uniform_routing_distinct_experts():
    r = UniformRouting(8, 2)
    assert r.distinct(1) == pytest.approx(2.0)
    assert r.distinct(1000) == pytest.approx(8.0)
    assert 2 < r.distinct(4) < 8
