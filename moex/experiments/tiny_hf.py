"""Tiny random transformers Qwen3-VL / Qwen3-VL-MoE checkpoints: a dense / MoE pair that the
synthetic benchmark's word tokenizer can talk to, for demos of the converted-checkpoint paths.

    moex make-tiny-hf qwen3-vl runs/hf/qwen3-vl-tiny
    moex make-tiny-hf qwen3-vl-moe runs/hf/qwen3-vl-moe-tiny
    python -m checkpoints_convert runs/hf/qwen3-vl-tiny ckpt/qwen3-vl-tiny

Each folder is what `save_pretrained` writes for a randomly initialised
`Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration` (torch.manual_seed(seed)),
plus the synthetic word tokenizer's tokenizer.json (`moex.data.vocab.synthetic_tokenizer`) and a
Qwen3-VL preprocessor_config.json (`moex.data.qwen_images.QwenImageSpec`, the tower's patch and
merge sizes, a small pixel budget). The vocabulary is sized to the word tokenizer: image
placeholder 4, pad 0, bos 1, eos 2 as its specials; <|vision_start|>, <|vision_end|> and the video
placeholder get ids above the tokenizer's words (the tokenizer never emits them).

The pair shares everything but the decoder FFNs: the same vision tower (built from the same
seed, so its weights are equal), the same attention widths, and the MoE's active FFN width
(top_k x moe_intermediate_size) equals the dense intermediate_size -- matched active
parameters, as the `small-*` presets are.

Sizes (SIZES): "demo" runs `experiments/vlm_efficiency.py --checkpoint` on the pair in minutes
on 2 CPU cores (text d 128, 4 layers, head_dim 16, MRoPE sections [2, 3, 3] interleaved; vision
depth 4, width 64, 8 px patches merged 2 x 2, an 8 x 8 learned position grid -> 64 px images,
16 image tokens, DeepStack at blocks 1 and 2; MoE 8 experts top-2 of 128); "test" is smaller
still, for the test suite. The folder is written atomically; an existing OUT is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from moex.checkpoint import staged
from moex.data.qwen_images import QwenImageSpec
from moex.data.vocab import synthetic_tokenizer, write_tokenizer
from moex.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID

ARCHS = {"qwen3-vl": "Qwen3VLForConditionalGeneration",
         "qwen3-vl-moe": "Qwen3VLMoeForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class TinySize:
    """The shapes of one tiny pair (text decoder, MoE FFNs, vision tower)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]   # sums to head_dim / 2
    ffn: int                              # dense intermediate_size
    experts: int
    top_k: int                            # moe_intermediate_size = ffn / top_k
    vision_depth: int
    vision_width: int
    vision_heads: int
    vision_ffn: int
    patch: int
    merge: int
    pos_grid: int                         # G: G x G learned positions -> G * patch px images
    deepstack: tuple[int, ...]
    max_positions: int = 4096


SIZES = {
    "demo": TinySize(hidden=128, layers=4, heads=8, kv_heads=4, head_dim=16,
                     mrope_section=(2, 3, 3), ffn=256, experts=8, top_k=2, vision_depth=4,
                     vision_width=64, vision_heads=4, vision_ffn=128, patch=8, merge=2,
                     pos_grid=8, deepstack=(1, 2)),
    "test": TinySize(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16,
                     mrope_section=(2, 3, 3), ffn=64, experts=4, top_k=2, vision_depth=2,
                     vision_width=32, vision_heads=2, vision_ffn=64, patch=8, merge=2,
                     pos_grid=4, deepstack=(0, 1), max_positions=512),
}


@dataclasses.dataclass(frozen=True)
class TinyHFConfig:
    arch: Literal["qwen3-vl", "qwen3-vl-moe"]
    out: str
    seed: int = 0
    size: Literal["demo", "test"] = "demo"


def special_ids(vocab_words: int) -> dict:
    """The config's token ids: the word tokenizer's specials, then the three Qwen3-VL ids the
    tokenizer lacks just above its words (inside the vocabulary, never produced by it)."""
    return dict(image_token_id=IMAGE_ID, vision_start_token_id=vocab_words,
                vision_end_token_id=vocab_words + 1, video_token_id=vocab_words + 2)


def hf_config(arch: str, size: TinySize, vocab_words: int):
    """The transformers config of the tiny `arch` ("qwen3-vl" or "qwen3-vl-moe")."""
    import transformers as T                     # optional dependencies (moex[convert])
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {sorted(ARCHS)}")
    s = size
    if sum(s.mrope_section) * 2 != s.head_dim or s.ffn % s.top_k:
        raise ValueError(f"size {s}: mrope_section must sum to head_dim / 2 and top_k divide ffn")
    ids = special_ids(vocab_words)
    text = dict(vocab_size=vocab_words + 3, hidden_size=s.hidden, intermediate_size=s.ffn,
                num_hidden_layers=s.layers, num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                max_position_embeddings=s.max_positions, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(s.mrope_section),
                                 "mrope_interleaved": True})
    vision = dict(depth=s.vision_depth, hidden_size=s.vision_width,
                  intermediate_size=s.vision_ffn, num_heads=s.vision_heads, patch_size=s.patch,
                  spatial_merge_size=s.merge, temporal_patch_size=2, out_hidden_size=s.hidden,
                  num_position_embeddings=s.pos_grid ** 2,
                  deepstack_visual_indexes=list(s.deepstack))
    if arch == "qwen3-vl":
        return T.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                               **ids)
    moe = dict(text, num_experts=s.experts, num_experts_per_tok=s.top_k,
               moe_intermediate_size=s.ffn // s.top_k, decoder_sparse_step=1, mlp_only_layers=[])
    return T.Qwen3VLMoeConfig(text_config=moe, vision_config=vision, tie_word_embeddings=False,
                              **ids)


def image_spec(size: TinySize) -> QwenImageSpec:
    """The processor settings: the tower's patch / merge, at most the native G x G grid's
    pixels (so real images shrink to the tower's size), at least one merged patch."""
    side = size.patch * size.merge
    return QwenImageSpec(patch_size=size.patch, temporal_patch_size=2, merge_size=size.merge,
                         min_pixels=side * side, max_pixels=(size.pos_grid * size.patch) ** 2)


def make(spec: TinyHFConfig) -> pathlib.Path:
    """Write spec.out: the tiny random model (save_pretrained), tokenizer.json and
    preprocessor_config.json. FileExistsError if it exists."""
    import torch
    import transformers as T
    out = pathlib.Path(spec.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output folder")
    size = SIZES[spec.size]
    words = synthetic_tokenizer()
    cfg = hf_config(spec.arch, size, words.get_vocab_size(with_added_tokens=True))
    torch.manual_seed(spec.seed)              # transformers builds the tower first: the same
    model = T.AutoModelForImageTextToText.from_config(cfg)   # weights in both (tested)
    with staged(out) as tmp:
        model.save_pretrained(tmp)
        write_tokenizer(words, tmp)
        image_spec(size).write(tmp)
    return out


def main(spec: TinyHFConfig) -> int:
    out = make(spec)
    print(f"wrote {out} ({ARCHS[spec.arch]}, size {spec.size}, seed {spec.seed})")
    return 0
