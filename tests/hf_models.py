"""Tiny random transformers models, one per supported architecture, saved with save_pretrained.

Weights use initializer_range 0.2 (instead of 0.02) so logits and routing are far from uniform and a
parity failure cannot hide in near-zero numbers.
"""

import pathlib

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def configs():
    import transformers as T
    return {
        # GQA + tied embeddings
        "llama": T.LlamaConfig(**COMMON, tie_word_embeddings=True),
        # sliding window shorter than the test sequences
        "mistral": T.MistralConfig(**COMMON, sliding_window=5, head_dim=8),
        "mixtral": T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                   router_jitter_noise=0.0),
        # sigmoid-gated shared expert, a dense layer among MoE layers, no renormalisation
        "qwen2_moe": T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24,
                                      decoder_sparse_step=1, mlp_only_layers=[1],
                                      norm_topk_prob=False),
        # top-1, per-head q/k norm, head_dim != hidden / heads
        "qwen3_moe": T.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=1,
                                      moe_intermediate_size=16, head_dim=16, norm_topk_prob=True),
        "olmoe": T.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
        # MLA with low-rank q, group-limited routing, scaled weights, first layer dense
        "deepseek_v2": T.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4},
                                          n_routed_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, n_shared_experts=1,
                                          first_k_dense_replace=1, kv_lora_rank=16,
                                          q_lora_rank=12, qk_rope_head_dim=8,
                                          qk_nope_head_dim=8, v_head_dim=8,
                                          topk_method="group_limited_greedy", n_group=2,
                                          topk_group=1, routed_scaling_factor=2.0),
        "llava": _llava(T, T.LlamaConfig(**COMMON)),
        "llava_mixtral": _llava(T, T.MixtralConfig(**COMMON, num_local_experts=4,
                                                   num_experts_per_tok=2)),
        "llava_mistral": _llava(T, T.MistralConfig(**COMMON, sliding_window=8)),
        # tied embeddings, head_dim != hidden / heads, interleaved MRoPE, DeepStack at 2 blocks
        "qwen3_vl": T.Qwen3VLConfig(text_config=QWEN3_TEXT, vision_config=QWEN3_VISION,
                                    tie_word_embeddings=True, **QWEN3_IDS),
        # 5 experts top-2, a dense layer among MoE layers
        "qwen3_vl_moe": T.Qwen3VLMoeConfig(
            text_config=dict(QWEN3_TEXT, num_experts=5, num_experts_per_tok=2,
                             moe_intermediate_size=14, decoder_sparse_step=1,
                             mlp_only_layers=[1]),
            vision_config=QWEN3_VISION, **QWEN3_IDS),
        # 4 experts in block 1 of each stack (3 + 2 blocks), capacity 2 per sequence: the
        # test batches drop tokens in both stacks
        "switch_drop": T.SwitchTransformersConfig(**SWITCH, num_layers=3, num_decoder_layers=2,
                                                  num_sparse_encoder_layers=1,
                                                  num_sparse_decoder_layers=1, num_experts=4,
                                                  expert_capacity=2),
        # 8 experts in every encoder block and decoder block 1 (4 + 3 blocks), capacity above
        # any test length (nothing dropped), an untied LM head, decoder start != pad
        "switch": T.SwitchTransformersConfig(**{**SWITCH, "decoder_start_token_id": 3},
                                             num_layers=4, num_decoder_layers=3,
                                             num_sparse_encoder_layers=4,
                                             num_sparse_decoder_layers=1, num_experts=8,
                                             expert_capacity=64, tie_word_embeddings=False),
    }


# Switch Transformers: odd widths; 8 relative buckets reaching 12 positions, so the test lengths
# (up to 20) use the logarithmic and the saturated buckets. See _switch_weights for the weights.
SWITCH = dict(vocab_size=97, d_model=40, d_kv=12, num_heads=3, d_ff=56,
              relative_attention_num_buckets=8, relative_attention_max_distance=12,
              initializer_factor=1.0, router_jitter_noise=0.01, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
SWITCH_ARCHS = ("switch_drop", "switch")
DECODER_FFN_GAIN = 10.0


def _switch_weights(model) -> None:
    """With transformers' initialisation a tiny random Switch model's greedy output is one token
    repeated: the decoder's state is mostly the encoder's (the same at every step) and the
    previous token's own embedding (tied: it predicts itself). Its FFN outputs (dense and
    experts, `wo`) x DECODER_FFN_GAIN make each step a random function of the previous token,
    so greedy runs vary. (initializer_factor 2 also varies them, but scales q.k scores ~16x:
    transformers' own fp32 logits are then ~7e-4 from its fp64 ones, above the 1e-4 tested.)
    transformers 5 keeps the stacks' embed_tokens apart from `shared` when the embeddings are
    untied; they start equal here, as in every Switch checkpoint (one tensor before v5)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoder.block.") and ".layer.2." in name \
                    and name.endswith("wo.weight"):
                p.mul_(DECODER_FFN_GAIN)
        if not model.config.tie_word_embeddings:
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)


# Qwen3-VL: odd widths; a 5 x 5 learned position grid (resampled to every image's patch grid);
# 4 px patches merged 2 x 2, so images are multiples of 8 px (16 px square by default).
QWEN3_TEXT = dict(vocab_size=101, hidden_size=40, intermediate_size=52, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [2, 2, 2], "mrope_interleaved": True})
QWEN3_VISION = dict(depth=3, hidden_size=24, intermediate_size=44, num_heads=2, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=40,
                    num_position_embeddings=25, deepstack_visual_indexes=[0, 2],
                    initializer_range=0.2)
QWEN3_IDS = dict(image_token_id=97, vision_start_token_id=98, vision_end_token_id=99,
                 video_token_id=100)


def _llava(T, text):
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, image_size=16, patch_size=4,
                                projection_dim=16, initializer_range=0.2)
    return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=95,
                         image_seq_length=16)


ARCHS = ("llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
         "llava", "llava_mixtral", "llava_mistral", "qwen3_vl", "qwen3_vl_moe")
QWEN3_VL = ("qwen3_vl", "qwen3_vl_moe")


def model_class(name):
    import transformers as T
    if name in SWITCH_ARCHS:
        return T.SwitchTransformersForConditionalGeneration
    if name in QWEN3_VL:
        return T.AutoModelForImageTextToText
    return T.LlavaForConditionalGeneration if name.startswith("llava") else T.AutoModelForCausalLM


def save(name, path: pathlib.Path, **save_kw) -> pathlib.Path:
    """save_pretrained folder of the tiny model `name` (seed 0, so every call gives the same)."""
    import torch
    torch.manual_seed(0)
    cfg = configs()[name]
    cls = model_class(name)
    model = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)
    if name in SWITCH_ARCHS:
        _switch_weights(model)
    model.save_pretrained(path, **save_kw)
    return path
