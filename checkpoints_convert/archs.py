"""Per-architecture tables: HF config.json <-> moex config, and the key mapping rules.

Supported `architectures[0]` values are the keys of ARCHITECTURES. Each entry knows
  to_moex(hf_config) -> VLMConfig (EncDecConfig for encoder-decoders)
  rules(config)      -> [Rule]            (canonical HF keys: what `save_pretrained` writes)
  aliases                                 (other spellings of keys, rewritten on read)
  to_hf(config, base) -> dict             (config.json for export)
The encoder-decoder (Switch Transformers) tables live in checkpoints_convert.switch.
"""

from __future__ import annotations

import dataclasses
import math
import re

from moex.config import (DecoderConfig, MoEConfig, ProjectorConfig, VisionConfig, VLMConfig)

from checkpoints_convert import switch
from checkpoints_convert.mapping import (Rule, bias_heads, copy, expert_down, expert_gate_up,
                                         fused_down, fused_gate_up, heads_in, heads_out, linear,
                                         patch_conv, patch_conv3d, qkv_bias_heads, qkv_heads,
                                         stacked_linear)
from checkpoints_convert.reader import CheckpointError


def _get(hf: dict, key: str, default=None):
    return hf[key] if hf.get(key) is not None else default


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"rope type {kind!r} is not supported (only 'default' RoPE)")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_act(hf: dict, expected: str) -> None:
    act = hf.get("hidden_act", expected)
    if act != expected:
        raise CheckpointError(f"hidden_act {act!r} is not supported here; expected {expected!r}")


# ---------------------------------------------------------------------------------------------
# config translation
# ---------------------------------------------------------------------------------------------

def _decoder(hf: dict, arch: str) -> DecoderConfig:
    _check_act(hf, "silu")
    heads = hf["num_attention_heads"]
    d = hf["hidden_size"]
    kw = dict(vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
              num_heads=heads, num_kv_heads=_get(hf, "num_key_value_heads", heads),
              ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
              rope_theta=_rope_theta(hf), tie_embeddings=bool(hf.get("tie_word_embeddings")),
              max_seq_len=hf.get("max_position_embeddings", 4096))
    head_dim = _get(hf, "head_dim")
    if head_dim and head_dim != d // heads:
        kw["head_dim"] = head_dim
    bias = bool(hf.get("attention_bias"))
    kw.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias")))
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        kw["sliding_window"] = _get(hf, "sliding_window")
    if arch == "Qwen2MoeForCausalLM":
        kw.update(qkv_bias=hf.get("qkv_bias", True), out_bias=False)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM") and hf.get("use_sliding_window"):
        raise CheckpointError("use_sliding_window=True is not supported for Qwen MoE models")
    if arch in ("Qwen3MoeForCausalLM",) + QWEN3_VL:
        kw["qk_norm"] = "head"
    if arch == "Qwen3VLForConditionalGeneration" and head_dim is None:
        kw["head_dim"] = 128                 # Qwen3-VL's text config default, not hidden / heads
    if arch in QWEN3_VL:
        # transformers' Qwen3-VL always interleaves the t / h / w frequencies
        rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kw["mrope_section"] = tuple(rp.get("mrope_section") or (24, 20, 20))
        half = kw.get("head_dim", d // heads) // 2
        if sum(kw["mrope_section"]) != half:
            raise CheckpointError(
                f"field 'text_config.rope_parameters.mrope_section' "
                f"{list(kw['mrope_section'])} must sum to head_dim / 2 = {half} (field "
                f"'text_config.head_dim'); [24, 20, 20] is the default when it or "
                f"'text_config.rope_parameters' is absent")
    if arch == "OlmoeForCausalLM":
        kw["qk_norm"] = "full"
        if hf.get("clip_qkv"):
            raise CheckpointError(f"OLMoE clip_qkv={hf['clip_qkv']} is not supported")
    if arch == "DeepseekV2ForCausalLM":
        kw.update(attention="mla", q_lora_rank=_get(hf, "q_lora_rank"),
                  kv_lora_rank=hf["kv_lora_rank"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                  qk_nope_head_dim=hf["qk_nope_head_dim"], v_head_dim=hf["v_head_dim"],
                  rope_interleaved=True, num_kv_heads=heads)
        kw.pop("head_dim", None)
    kw["moe"] = _moe(hf, arch)
    return DecoderConfig(**kw)


def _moe(hf: dict, arch: str) -> MoEConfig:
    if arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3VLForConditionalGeneration"):
        return MoEConfig()
    if arch == "Qwen3VLMoeForConditionalGeneration":
        # transformers' Qwen3-VL-MoE router always renormalises the top-k weights (whatever
        # norm_topk_prob says); experts are 'num_experts' or 'num_local_experts' (its alias)
        step = _get(hf, "decoder_sparse_step", 1)
        n = _get(hf, "num_experts") or hf["num_local_experts"]
        return MoEConfig(kind="hard", num_experts=n, top_k=hf["num_experts_per_tok"],
                         expert_dim=hf["moe_intermediate_size"], renormalize=True, every_n=step,
                         layer_offset=step - 1,
                         dense_layers=tuple(hf.get("mlp_only_layers") or ()))
    if arch == "MixtralForCausalLM":
        return MoEConfig(kind="hard", num_experts=hf["num_local_experts"],
                         top_k=hf["num_experts_per_tok"], expert_dim=hf["intermediate_size"])
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        step = _get(hf, "decoder_sparse_step", 1)
        n = _get(hf, "num_experts") or hf["num_local_experts"]     # Qwen3-MoE: either spelling
        kw = dict(kind="hard", num_experts=n, top_k=hf["num_experts_per_tok"],
                  expert_dim=hf["moe_intermediate_size"],
                  renormalize=bool(hf.get("norm_topk_prob", False)), every_n=step,
                  layer_offset=step - 1, dense_layers=tuple(hf.get("mlp_only_layers") or ()))
        if arch == "Qwen2MoeForCausalLM":
            kw.update(num_shared_experts=1, shared_dim=hf["shared_expert_intermediate_size"],
                      shared_gate="sigmoid")
        return MoEConfig(**kw)
    if arch == "OlmoeForCausalLM":
        return MoEConfig(kind="hard", num_experts=hf["num_experts"],
                         top_k=hf["num_experts_per_tok"], expert_dim=hf["intermediate_size"],
                         renormalize=bool(hf.get("norm_topk_prob", False)))
    if arch == "DeepseekV2ForCausalLM":
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(f"DeepSeek-V2 topk_method {method!r} is not supported; "
                                  "expected 'greedy' or 'group_limited_greedy'")
        if hf.get("norm_topk_prob"):
            raise CheckpointError("DeepSeek-V2 with norm_topk_prob=True is not supported "
                                  "(transformers ignores it)")
        groups = (_get(hf, "n_group", 1), _get(hf, "topk_group", 1)) \
            if method == "group_limited_greedy" else (1, 1)
        n_shared = _get(hf, "n_shared_experts", 0)
        return MoEConfig(kind="hard", num_experts=hf["n_routed_experts"],
                         top_k=hf["num_experts_per_tok"], expert_dim=hf["moe_intermediate_size"],
                         renormalize=False, num_shared_experts=n_shared,
                         shared_dim=hf["moe_intermediate_size"] if n_shared else 0,
                         first_k_dense=_get(hf, "first_k_dense_replace", 0),
                         routed_scaling=float(_get(hf, "routed_scaling_factor", 1.0)),
                         num_groups=groups[0], topk_groups=groups[1])
    raise AssertionError(arch)


def _clip(hv: dict) -> VisionConfig:
    act = hv.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"CLIP hidden_act {act!r} is not supported")
    return VisionConfig(image_size=hv["image_size"], patch_size=hv["patch_size"],
                        channels=hv.get("num_channels", 3), d_model=hv["hidden_size"],
                        num_layers=hv["num_hidden_layers"], num_heads=hv["num_attention_heads"],
                        mlp_dim=hv["intermediate_size"], activation=act,
                        norm_eps=hv.get("layer_norm_eps", 1e-5), class_token=True, pre_norm=True,
                        post_norm=True, patch_bias=False)


def _llava(hf: dict) -> VLMConfig:
    text, vision = hf["text_config"], hf["vision_config"]
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"LLaVA vision tower {vision.get('model_type')!r} is not supported; "
                              "expected 'clip_vision_model'")
    text_arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM"}.get(text.get("model_type", "llama"))
    if text_arch is None:
        raise CheckpointError(f"LLaVA text model {text.get('model_type')!r} is not supported; "
                              "expected llama, mistral or mixtral")
    layer = hf.get("vision_feature_layer", -2)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or layer >= 0 or strategy not in ("default", "full"):
        raise CheckpointError(f"vision_feature_layer {layer!r} / strategy {strategy!r}: "
                              "expected a negative int and 'default' or 'full'")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or \
            not hf.get("multimodal_projector_bias", True):
        raise CheckpointError("only the LLaVA-1.5 projector (gelu, with biases) is supported")
    vis = dataclasses.replace(_clip(vision), feature_layer=layer,
                              drop_class_token=strategy == "default")
    dec = _decoder(text, text_arch)
    if hf.get("tie_word_embeddings") is not None:
        dec = dataclasses.replace(dec, tie_embeddings=bool(hf["tie_word_embeddings"]))
    return VLMConfig("llava", dec, vis, ProjectorConfig(hidden_dim=dec.d_model, activation="gelu"),
                     image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)))


QWEN3_VL = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
VISION_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
               "quick_gelu": "quick_gelu"}


def _qwen3_vision(hv: dict, text_width: int) -> VisionConfig:
    """Qwen3-VL's vision_config -> VisionConfig. image_size (the size moex's fixed-size data
    paths resize to) is the learned position grid's native size, G x patch_size px."""
    act = hv.get("hidden_act", "gelu_pytorch_tanh")
    if act not in VISION_ACTS:
        raise CheckpointError(f"vision_config.hidden_act {act!r} is not supported; expected one "
                              f"of {sorted(VISION_ACTS)}")
    width, heads = hv["hidden_size"], hv["num_heads"]
    if width % heads or (width // heads) % 4:
        raise CheckpointError(f"vision_config.hidden_size {width} / num_heads {heads} must give a "
                              "head width that is a multiple of 4 (2D rotary embedding)")
    if hv["out_hidden_size"] != text_width:
        raise CheckpointError(f"vision_config.out_hidden_size {hv['out_hidden_size']} must equal "
                              f"text_config.hidden_size {text_width}")
    n = hv["num_position_embeddings"]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise CheckpointError(f"vision_config.num_position_embeddings {n} must be a square "
                              "(a G x G learned position grid)")
    patch, merge = hv["patch_size"], hv["spatial_merge_size"]
    side = patch * merge
    theta = (hv.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    deep = tuple(hv.get("deepstack_visual_indexes", (8, 16, 24)))
    if any(not 0 <= i < hv["depth"] for i in deep):
        raise CheckpointError(f"field 'vision_config.deepstack_visual_indexes' {list(deep)} "
                              f"(default [8, 16, 24] when absent) must be block indices below "
                              f"'vision_config.depth' = {hv['depth']}")
    return VisionConfig(
        image_size=max(side, grid * patch // side * side), patch_size=patch,
        channels=hv.get("in_channels", 3), d_model=width, num_layers=hv["depth"],
        num_heads=heads, mlp_dim=hv["intermediate_size"], activation=VISION_ACTS[act],
        norm_eps=1e-6, class_token=False, pre_norm=False, post_norm=True, feature_layer=-1,
        drop_class_token=False, patch_bias=True, image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5), spatial_merge=merge, temporal_patch=hv["temporal_patch_size"],
        rope_theta=float(theta), pos_grid=grid,
        deepstack_layers=deep)


def _qwen3_vl(hf: dict, arch: str) -> VLMConfig:
    text = hf["text_config"]
    dec = _decoder(text, arch)
    tie = hf.get("tie_word_embeddings")
    if tie is not None:     # the top-level flag decides (transformers ties by it)
        dec = dataclasses.replace(dec, tie_embeddings=bool(tie))
    vis = _qwen3_vision(hf["vision_config"], dec.d_model)
    proj = ProjectorConfig(hidden_dim=vis.d_model * vis.spatial_merge ** 2, activation="gelu")
    return VLMConfig(arch, dec, vis, proj,
                     image_token_id=hf.get("image_token_id", 151655), **{**_ids(text), **_ids(hf)})


def _ids(hf: dict) -> dict:
    out = {}
    if isinstance(hf.get("pad_token_id"), int):
        out["pad_token_id"] = hf["pad_token_id"]
    if isinstance(hf.get("eos_token_id"), int):
        out["eos_token_id"] = hf["eos_token_id"]
    return out


# ---------------------------------------------------------------------------------------------
# key rules
# ---------------------------------------------------------------------------------------------

def decoder_rules(c: DecoderConfig, arch: str, p: str, lm_head: str, mo: str = "decoder") -> list[Rule]:
    """Rules for a Llama-family decoder. p: HF prefix of the base model ('model.')."""
    rules = [Rule((f"{mo}/embed",), (f"{p}embed_tokens.weight",), copy()),
             Rule((f"{mo}/final_norm/scale",), (f"{p}norm.weight",), copy())]
    if not c.tie_embeddings:
        rules.append(Rule((f"{mo}/lm_head/kernel",), (lm_head,), linear()))
    for i in range(c.num_layers):
        L, M = f"{p}layers.{i}.", f"{mo}/layer_{i}/"
        rules += [Rule((M + "attn_norm/scale",), (L + "input_layernorm.weight",), copy()),
                  Rule((M + "ffn_norm/scale",), (L + "post_attention_layernorm.weight",), copy())]
        rules += _attention_rules(c, L + "self_attn.", M + "attn/")
        rules += _ffn_rules(c, i, arch, L, M + "ffn/")
    return rules


def _attention_rules(c: DecoderConfig, A: str, M: str) -> list[Rule]:
    h, kv = c.num_heads, c.num_kv_heads
    if c.attention == "mla":
        rules = [Rule((M + "kv_a/kernel",), (A + "kv_a_proj_with_mqa.weight",), linear()),
                 Rule((M + "kv_a_norm/scale",), (A + "kv_a_layernorm.weight",), copy()),
                 Rule((M + "kv_b",), (A + "kv_b_proj.weight",), heads_in(h)),
                 Rule((M + "o",), (A + "o_proj.weight",), heads_out(h))]
        if c.q_lora_rank is None:
            rules.append(Rule((M + "q",), (A + "q_proj.weight",), heads_in(h)))
        else:
            rules += [Rule((M + "q_a/kernel",), (A + "q_a_proj.weight",), linear()),
                      Rule((M + "q_a_norm/scale",), (A + "q_a_layernorm.weight",), copy()),
                      Rule((M + "q_b",), (A + "q_b_proj.weight",), heads_in(h))]
            if c.qkv_bias:
                rules.append(Rule((M + "q_a/bias",), (A + "q_a_proj.bias",), copy()))
        if c.qkv_bias:
            rules.append(Rule((M + "kv_a/bias",), (A + "kv_a_proj_with_mqa.bias",), copy()))
        if c.out_bias:
            rules.append(Rule((M + "o_bias",), (A + "o_proj.bias",), copy()))
        return rules
    rules = [Rule((M + "q",), (A + "q_proj.weight",), heads_in(h)),
             Rule((M + "k",), (A + "k_proj.weight",), heads_in(kv)),
             Rule((M + "v",), (A + "v_proj.weight",), heads_in(kv)),
             Rule((M + "o",), (A + "o_proj.weight",), heads_out(h))]
    if c.qkv_bias:
        rules += [Rule((M + f"{x}_bias",), (A + f"{x}_proj.bias",), bias_heads(n))
                  for x, n in (("q", h), ("k", kv), ("v", kv))]
    if c.out_bias:
        rules.append(Rule((M + "o_bias",), (A + "o_proj.bias",), copy()))
    if c.qk_norm != "none":
        rules += [Rule((M + "q_norm/scale",), (A + "q_norm.weight",), copy()),
                  Rule((M + "k_norm/scale",), (A + "k_norm.weight",), copy())]
    return rules


def _mlp_rules(H: str, M: str, bias: bool, names=("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    rules = []
    for ours, theirs in zip(("gate", "up", "down"), names):
        rules.append(Rule((f"{M}{ours}/kernel",), (f"{H}{theirs}.weight",), linear()))
        if bias:
            rules.append(Rule((f"{M}{ours}/bias",), (f"{H}{theirs}.bias",), copy()))
    return rules


EXPERT_NAMES = {"MixtralForCausalLM": ("block_sparse_moe.", "w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("mlp.", "gate_proj", "up_proj", "down_proj")


def _ffn_rules(c: DecoderConfig, i: int, arch: str, L: str, M: str) -> list[Rule]:
    moe = c.moe
    if not moe.is_moe_layer(i):
        return _mlp_rules(L + "mlp.", M + "mlp/", c.mlp_bias)
    block, gate, up, down = EXPERT_NAMES.get(arch, DEFAULT_EXPERT_NAMES)
    B = L + block
    E = range(moe.num_experts)
    rules = [Rule((M + "router/kernel",), (B + "gate.weight",), linear()),
             Rule((M + "experts/w_gate",), tuple(f"{B}experts.{e}.{gate}.weight" for e in E),
                  stacked_linear()),
             Rule((M + "experts/w_up",), tuple(f"{B}experts.{e}.{up}.weight" for e in E),
                  stacked_linear()),
             Rule((M + "experts/w_down",), tuple(f"{B}experts.{e}.{down}.weight" for e in E),
                  stacked_linear())]
    if moe.num_shared_experts:
        shared = "shared_expert." if arch == "Qwen2MoeForCausalLM" else "shared_experts."
        rules += _mlp_rules(B + shared, M + "shared_experts/", False)
        if moe.shared_gate == "sigmoid":
            rules.append(Rule((M + "shared_gate/kernel",), (B + "shared_expert_gate.weight",),
                              linear()))
    return rules


def fused_expert_rules(rule: Rule) -> list[Rule] | None:
    """The fused-layout alternative for a per-expert rule group (called on the w_gate rule)."""
    first = rule.hf[0]
    m = re.match(r"(.*experts\.)0\.[^.]+\.weight$", first)
    if not m:
        return None
    base, M = m.group(1), rule.moex[0].rsplit("/", 1)[0] + "/"
    return [Rule((M + "w_gate", M + "w_up"), (base + "gate_up_proj",), fused_gate_up()),
            Rule((M + "w_down",), (base + "down_proj",), fused_down())]


def clip_rules(v: VisionConfig, P: str, mo: str = "vision") -> list[Rule]:
    h = v.num_heads
    rules = [Rule((f"{mo}/patch_embed/kernel",), (P + "embeddings.patch_embedding.weight",),
                  patch_conv(v.patch_size, v.channels)),
             Rule((f"{mo}/class_token",), (P + "embeddings.class_embedding",), copy()),
             Rule((f"{mo}/pos_embed",), (P + "embeddings.position_embedding.weight",), copy())]
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        rules += [Rule((f"{mo}/{ours}/scale",), (f"{P}{theirs}.weight",), copy()),
                  Rule((f"{mo}/{ours}/bias",), (f"{P}{theirs}.bias",), copy())]
    for i in range(v.num_layers):
        L, M = f"{P}encoder.layers.{i}.", f"{mo}/layer_{i}/"
        for ours, theirs in (("attn_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
            rules += [Rule((f"{M}{ours}/scale",), (f"{L}{theirs}.weight",), copy()),
                      Rule((f"{M}{ours}/bias",), (f"{L}{theirs}.bias",), copy())]
        for x in ("q", "k", "v"):
            rules += [Rule((f"{M}attn/{x}",), (f"{L}self_attn.{x}_proj.weight",), heads_in(h)),
                      Rule((f"{M}attn/{x}_bias",), (f"{L}self_attn.{x}_proj.bias",), bias_heads(h))]
        rules += [Rule((f"{M}attn/o",), (f"{L}self_attn.out_proj.weight",), heads_out(h)),
                  Rule((f"{M}attn/o_bias",), (f"{L}self_attn.out_proj.bias",), copy())]
        for ours, theirs in (("up", "fc1"), ("down", "fc2")):
            rules += [Rule((f"{M}ffn/mlp/{ours}/kernel",), (f"{L}mlp.{theirs}.weight",), linear()),
                      Rule((f"{M}ffn/mlp/{ours}/bias",), (f"{L}mlp.{theirs}.bias",), copy())]
    return rules


def llava_rules(cfg: VLMConfig, text_arch: str) -> list[Rule]:
    rules = decoder_rules(cfg.decoder, text_arch, "language_model.model.",
                          "language_model.lm_head.weight")
    rules += clip_rules(cfg.vision, "vision_tower.")
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        rules += [Rule((f"projector/{ours}/kernel",), (f"multi_modal_projector.{theirs}.weight",),
                       linear()),
                  Rule((f"projector/{ours}/bias",), (f"multi_modal_projector.{theirs}.bias",),
                       copy())]
    return rules


def qwen3_vision_rules(v: VisionConfig, P: str = "model.visual.") -> list[Rule]:
    """Qwen3-VL's vision tower, its patch merger (post_norm + projector) and DeepStack mergers."""
    h = v.num_heads

    def norm(ours, theirs):
        return [Rule((f"{ours}/scale",), (f"{theirs}.weight",), copy()),
                Rule((f"{ours}/bias",), (f"{theirs}.bias",), copy())]

    def dense(ours, theirs):
        return [Rule((f"{ours}/kernel",), (f"{theirs}.weight",), linear()),
                Rule((f"{ours}/bias",), (f"{theirs}.bias",), copy())]

    rules = [Rule(("vision/patch_embed/kernel",), (P + "patch_embed.proj.weight",),
                  patch_conv3d(v.temporal_patch, v.patch_size, v.channels)),
             Rule(("vision/patch_embed/bias",), (P + "patch_embed.proj.bias",), copy()),
             Rule(("vision/pos_embed",), (P + "pos_embed.weight",), copy())]
    rules += norm("vision/post_norm", P + "merger.norm")
    rules += dense("projector/fc1", P + "merger.linear_fc1")
    rules += dense("projector/fc2", P + "merger.linear_fc2")
    for i in range(v.num_layers):
        L, M = f"{P}blocks.{i}.", f"vision/layer_{i}/"
        rules += norm(M + "attn_norm", L + "norm1") + norm(M + "ffn_norm", L + "norm2")
        rules += [Rule((M + "attn/q", M + "attn/k", M + "attn/v"), (L + "attn.qkv.weight",),
                       qkv_heads(h)),
                  Rule((M + "attn/q_bias", M + "attn/k_bias", M + "attn/v_bias"),
                       (L + "attn.qkv.bias",), qkv_bias_heads(h)),
                  Rule((M + "attn/o",), (L + "attn.proj.weight",), heads_out(h)),
                  Rule((M + "attn/o_bias",), (L + "attn.proj.bias",), copy())]
        rules += dense(M + "ffn/mlp/up", L + "mlp.linear_fc1")
        rules += dense(M + "ffn/mlp/down", L + "mlp.linear_fc2")
    for j in range(len(v.deepstack_layers)):
        D = f"{P}deepstack_merger_list.{j}."
        rules += norm(f"deepstack_{j}/norm", D + "norm")
        rules += dense(f"deepstack_{j}/mlp/fc1", D + "linear_fc1")
        rules += dense(f"deepstack_{j}/mlp/fc2", D + "linear_fc2")
    return rules


def fused_qwen_experts(rules: list[Rule], d: int, f: int, layout: str) -> list[Rule]:
    """Qwen3-VL-MoE keeps each layer's experts fused (experts.gate_up_proj, experts.down_proj;
    layouts: mapping.expert_gate_up). The per-expert rules of decoder_rules become those, with
    the per-expert keys as the alternative layout read when a file holds them instead."""
    by_path = {r.moex[0]: r for r in rules}
    out = []
    for r in rules:
        path = r.moex[0]
        if path.endswith(("experts/w_up", "experts/w_down")):
            continue
        if not path.endswith("experts/w_gate"):
            out.append(r)
            continue
        M, base = path[:-len("w_gate")], r.hf[0][:-len("0.gate_proj.weight")]
        out += [Rule((M + "w_gate", M + "w_up"), (base + "gate_up_proj",),
                     expert_gate_up(d, f, layout), alt=(r, by_path[M + "w_up"])),
                Rule((M + "w_down",), (base + "down_proj",), expert_down(d, f, layout),
                     alt=(by_path[M + "w_down"],))]
    return out


def qwen3_vl_rules(cfg: VLMConfig, arch: str, layout: str = "transformers") -> list[Rule]:
    c = cfg.decoder
    rules = decoder_rules(c, arch, "model.language_model.", "lm_head.weight")
    if c.moe.kind == "hard":
        rules = fused_qwen_experts(rules, c.d_model, c.moe.expert_dim, layout)
    return rules + qwen3_vision_rules(cfg.vision)


def qwen3_vl_layout(reader, cfg: VLMConfig) -> dict:
    """The rules' options that give back the files' own layout on export: the fused experts as
    transformers saves them, or as the published checkpoints hold them ('hub')."""
    c = cfg.decoder
    for key in sorted(reader.keys()):
        if key.endswith("experts.gate_up_proj"):
            shape = reader.shape(key)[1:]
            hub = shape == (c.d_model, 2 * c.moe.expert_dim) != (2 * c.moe.expert_dim, c.d_model)
            return {"layout": "hub" if hub else "transformers"}
    return {}


# ---------------------------------------------------------------------------------------------
# export: moex config -> config.json
# ---------------------------------------------------------------------------------------------

def decoder_to_hf(c: DecoderConfig, arch: str, base: dict) -> dict:
    hf = dict(base)
    hf.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.num_layers,
              num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              intermediate_size=c.ffn_dim, rms_norm_eps=c.norm_eps,
              tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_seq_len,
              hidden_act="silu", rope_parameters={"rope_type": "default",
                                                  "rope_theta": c.rope_theta})
    hf.pop("rope_theta", None)
    if arch in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        hf["head_dim"] = c.dim_per_head
    if arch in ("LlamaForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                "DeepseekV2ForCausalLM"):
        hf["attention_bias"] = c.qkv_bias
    if arch == "LlamaForCausalLM":
        hf["mlp_bias"] = c.mlp_bias
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        hf["sliding_window"] = c.sliding_window
    m = c.moe
    if arch in ("MixtralForCausalLM", "OlmoeForCausalLM"):   # every layer MoE, experts F wide
        if any(not m.is_moe_layer(i) for i in range(c.num_layers)):
            raise CheckpointError(f"{arch} has an MoE block in every layer; this config has "
                                  "dense layers")
        hf["intermediate_size"] = m.expert_dim
    if arch == "MixtralForCausalLM":
        hf.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        n_key = "num_local_experts" if arch == "Qwen3MoeForCausalLM" else "num_experts"
        hf.update({n_key: m.num_experts}, num_experts_per_tok=m.top_k,
                  norm_topk_prob=m.renormalize)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        hf.update(moe_intermediate_size=m.expert_dim, decoder_sparse_step=m.every_n,
                  mlp_only_layers=list(m.dense_layers))
    if arch == "Qwen2MoeForCausalLM":
        hf.update(shared_expert_intermediate_size=m.shared_dim, qkv_bias=c.qkv_bias)
    if arch == "DeepseekV2ForCausalLM":
        grouped = m.num_groups > 1
        hf.update(n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
                  moe_intermediate_size=m.expert_dim, n_shared_experts=m.num_shared_experts,
                  first_k_dense_replace=m.first_k_dense, routed_scaling_factor=m.routed_scaling,
                  topk_method="group_limited_greedy" if grouped else "greedy",
                  n_group=m.num_groups if grouped else None,
                  topk_group=m.topk_groups if grouped else None, norm_topk_prob=False,
                  q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                  qk_rope_head_dim=c.qk_rope_head_dim, qk_nope_head_dim=c.qk_nope_head_dim,
                  v_head_dim=c.v_head_dim)
    hf["architectures"] = [arch]
    hf["model_type"] = MODEL_TYPES[arch]
    return hf


def llava_to_hf(cfg: VLMConfig, base: dict) -> dict:
    hf = dict(base)
    text_arch = _text_arch_of(cfg)
    v = cfg.vision
    hf["text_config"] = decoder_to_hf(cfg.decoder, text_arch, base.get("text_config", {}))
    hf["text_config"].pop("architectures", None)
    hf["vision_config"] = dict(base.get("vision_config", {}), model_type="clip_vision_model",
                               image_size=v.image_size, patch_size=v.patch_size,
                               num_channels=v.channels, hidden_size=v.d_model,
                               num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                               intermediate_size=v.mlp_dim, hidden_act=v.activation,
                               layer_norm_eps=v.norm_eps)
    hf.update(architectures=["LlavaForConditionalGeneration"], model_type="llava",
              image_token_index=cfg.image_token_id, vision_feature_layer=v.feature_layer,
              vision_feature_select_strategy="default" if v.drop_class_token else "full",
              projector_hidden_act="gelu", multimodal_projector_bias=True,
              image_seq_length=v.num_image_tokens)
    return hf


def qwen3_vl_to_hf(cfg: VLMConfig, base: dict, arch: str) -> dict:
    hf = dict(base)
    c, v, m = cfg.decoder, cfg.vision, cfg.decoder.moe
    moe = arch == "Qwen3VLMoeForConditionalGeneration"
    kind = "qwen3_vl_moe" if moe else "qwen3_vl"
    text = dict(base.get("text_config", {}))
    rope = dict(text.get("rope_parameters") or {})
    rope.update(rope_type="default", rope_theta=c.rope_theta,
                mrope_section=list(c.mrope_section), mrope_interleaved=True)
    text.update(model_type=f"{kind}_text", vocab_size=c.vocab_size, hidden_size=c.d_model,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                num_key_value_heads=c.num_kv_heads, head_dim=c.dim_per_head,
                intermediate_size=c.ffn_dim, rms_norm_eps=c.norm_eps, hidden_act="silu",
                max_position_embeddings=c.max_seq_len, attention_bias=c.qkv_bias,
                rope_parameters=rope)
    if moe:
        text.pop("num_experts", None)
        text.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                    moe_intermediate_size=m.expert_dim, decoder_sparse_step=m.every_n,
                    mlp_only_layers=list(m.dense_layers), norm_topk_prob=True)
    vision = dict(base.get("vision_config", {}))
    vrope = dict(vision.get("rope_parameters") or {"rope_type": "axial"})
    vrope["rope_theta"] = v.rope_theta
    act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(v.activation, v.activation)
    vision.update(model_type=f"{kind}_vision", depth=v.num_layers, hidden_size=v.d_model,
                  hidden_act=act, intermediate_size=v.mlp_dim, num_heads=v.num_heads,
                  in_channels=v.channels, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge, temporal_patch_size=v.temporal_patch,
                  out_hidden_size=c.d_model, num_position_embeddings=v.pos_grid ** 2,
                  deepstack_visual_indexes=list(v.deepstack_layers), rope_parameters=vrope)
    hf.update(architectures=[arch], model_type=kind, text_config=text, vision_config=vision,
              image_token_id=cfg.image_token_id, tie_word_embeddings=c.tie_embeddings)
    return hf


def _text_arch_of(cfg: VLMConfig) -> str:
    if cfg.decoder.moe.kind == "hard":
        return "MixtralForCausalLM"
    return "MistralForCausalLM" if cfg.decoder.sliding_window else "LlamaForCausalLM"


MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe",
               "DeepseekV2ForCausalLM": "deepseek_v2"}


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    to_moex: callable
    rules: callable
    to_hf: callable
    aliases: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()   # regexes of HF keys that carry no parameters
    options: callable = None       # (reader, cfg) -> rules(cfg, **options) that export the
                                   # files' own layout (kept in moex.json)


IGNORE = (r".*rotary_emb\.inv_freq$", r".*position_ids$")


def _lm(arch: str) -> Architecture:
    def to_moex(hf):
        return VLMConfig(arch, _decoder(hf, arch), **_ids(hf)).validate()
    aliases = ()
    if arch == "MixtralForCausalLM":      # in-memory / fused spelling of the MoE block
        aliases = ((r"(model\.layers\.\d+\.)mlp\.", r"\1block_sparse_moe."),)
    return Architecture(arch, to_moex,
                        lambda cfg: decoder_rules(cfg.decoder, arch, "model.", "lm_head.weight"),
                        lambda cfg, base: decoder_to_hf(cfg.decoder, arch, base), aliases, IGNORE)


def _llava_arch() -> Architecture:
    def to_moex(hf):
        return _llava(hf).replace(**_ids(hf)).validate()
    aliases = ((r"^model\.language_model\.", "language_model.model."),
               (r"^lm_head\.", "language_model.lm_head."),
               (r"^model\.vision_tower\.", "vision_tower."),
               (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
               (r"^vision_tower\.vision_model\.", "vision_tower."),
               (r"^(language_model\.model\.layers\.\d+\.)mlp\.(gate\.|experts\.)",
                r"\1block_sparse_moe.\2"))
    return Architecture("LlavaForConditionalGeneration", to_moex,
                        lambda cfg: llava_rules(cfg, _text_arch_of(cfg)), llava_to_hf, aliases,
                        IGNORE)


def _qwen3_vl_arch(name: str) -> Architecture:
    def to_moex(hf):
        return _qwen3_vl(hf, name).validate()
    return Architecture(name, to_moex,
                        lambda cfg, layout="transformers": qwen3_vl_rules(cfg, name, layout),
                        lambda cfg, base: qwen3_vl_to_hf(cfg, base, name),
                        ignore=IGNORE, options=qwen3_vl_layout)


def _switch_arch() -> Architecture:
    return Architecture(switch.ARCH, switch.to_moex, switch.rules, switch.to_hf,
                        ignore=IGNORE + switch.IGNORE)


ARCHITECTURES = {a.name: a for a in [_lm(n) for n in MODEL_TYPES] + [_llava_arch()]
                 + [_qwen3_vl_arch(n) for n in QWEN3_VL] + [_switch_arch()]}


def architecture_of(hf: dict, where: str) -> Architecture:
    archs = hf.get("architectures") or []
    name = archs[0] if archs else None
    if name not in ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {name!r} is not supported; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]
