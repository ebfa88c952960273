"""Model sizes from shapes alone (`jax.eval_shape`): nothing is allocated, so a 46.7B preset is
summarised in seconds.

Active parameters per token follow the convention of the MoE papers (Mixtral's 12.9B): every
decoder parameter a token touches, embeddings and LM head included, with each MoE block's routed
experts counted at top_k / E. A causal-soft decoder block runs all its experts (fraction 1). For a
VLM, the vision tower and projector are reported per image token: a Soft MoE block computes E*P
slots for M tokens, so its experts count at P / M; a hard MoE block at top_k / E.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from moex.config import EncDecConfig, MoEConfig, VLMConfig, get_config
from moex.model import abstract_params
from moex.nn.decoder import kv_bytes_per_token


@dataclasses.dataclass
class ModelInfo:
    name: str
    total_params: int
    decoder_params: int
    vision_params: int
    projector_params: int
    routed_expert_params: int
    shared_expert_params: int
    active_params_per_token: int          # decoder, per text token
    vision_active_params_per_token: int   # vision tower + projector, per image token
    bytes_bf16: int
    bytes_fp32: int
    kv_bytes_per_token_bf16: int
    kv_bytes_per_token_fp32: int
    num_image_tokens: int
    encoder_params: int = 0               # encoder-decoder models: the encoder stack
    encoder_active_params_per_token: int = 0   # ... per encoder (input) token

    @property
    def expert_share(self) -> float:
        return self.routed_expert_params / self.total_params

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["expert_share"] = self.expert_share
        return d


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _layer_index(parts: list[str]) -> int:
    for p in parts:
        if p.startswith("layer_"):
            return int(p.split("_")[1])
    return 0


def _active_fraction(moe: MoEConfig, layer: int, tokens_per_group: int, causal: bool) -> float:
    if not moe.is_moe_layer(layer):
        return 1.0
    if moe.kind == "hard":
        return moe.top_k / moe.num_experts
    return 1.0 if causal else min(1.0, moe.soft_slots / max(tokens_per_group, 1))


def model_info(cfg: VLMConfig | EncDecConfig | str) -> ModelInfo:
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    if isinstance(cfg, EncDecConfig):
        return encdec_info(cfg)
    shapes = abstract_params(cfg)
    sums = dict(decoder=0, vision=0, projector=0, routed=0, shared=0)
    active = {"decoder": 0.0, "vision": 0.0, "projector": 0.0}
    n_img = cfg.vision.num_image_tokens if cfg.vision else 0
    vision_group = (cfg.vision.num_patches + cfg.vision.class_token) if cfg.vision else 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        n = math.prod(leaf.shape)
        parts = _path_str(path).split("/")
        part = "projector" if parts[0].startswith("deepstack_") else parts[0]   # its mergers
        sums[part] += n
        frac = 1.0
        if "experts" in parts:
            sums["routed"] += n
            if part == "decoder":
                frac = _active_fraction(cfg.decoder.moe, _layer_index(parts), 1, causal=True)
            elif part == "vision":
                frac = _active_fraction(cfg.vision.moe, _layer_index(parts), vision_group, False)
            else:
                frac = _active_fraction(cfg.projector.moe, 0, n_img, False)
        elif "shared_experts" in parts:
            sums["shared"] += n
        active[part] += n * frac
    total = sums["decoder"] + sums["vision"] + sums["projector"]
    return ModelInfo(
        name=cfg.name, total_params=total, decoder_params=sums["decoder"],
        vision_params=sums["vision"], projector_params=sums["projector"],
        routed_expert_params=sums["routed"], shared_expert_params=sums["shared"],
        active_params_per_token=round(active["decoder"]),
        vision_active_params_per_token=round(active["vision"] + active["projector"]),
        bytes_bf16=2 * total, bytes_fp32=4 * total,
        kv_bytes_per_token_bf16=kv_bytes_per_token(cfg.decoder, 2),
        kv_bytes_per_token_fp32=kv_bytes_per_token(cfg.decoder, 4),
        num_image_tokens=n_img)


def encdec_info(cfg: EncDecConfig) -> ModelInfo:
    """Sizes of an encoder-decoder: the shared embedding (and an untied head) count once, with
    the decoder; active parameters per decoder token include the embedding, per encoder token
    not (its lookup is no matmul); a Switch block's experts count at top_k / E."""
    sums = dict(encoder=0, decoder=0, routed=0)
    active = dict(encoder=0.0, decoder=0.0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        n = math.prod(leaf.shape)
        parts = _path_str(path).split("/")
        part = "encoder" if parts[0] == "encoder" else "decoder"
        sums[part] += n
        frac = 1.0
        if "experts" in parts:
            sums["routed"] += n
            moe = cfg.encoder_moe if part == "encoder" else cfg.decoder_moe
            frac = _active_fraction(moe, _layer_index(parts), 1, causal=False)
        active[part] += n * frac
    total = sums["encoder"] + sums["decoder"]
    kv = cfg.decoder_layers * 2 * cfg.num_heads * cfg.head_dim
    return ModelInfo(
        name=cfg.name, total_params=total, decoder_params=sums["decoder"], vision_params=0,
        projector_params=0, routed_expert_params=sums["routed"], shared_expert_params=0,
        active_params_per_token=round(active["decoder"]), vision_active_params_per_token=0,
        bytes_bf16=2 * total, bytes_fp32=4 * total, kv_bytes_per_token_bf16=2 * kv,
        kv_bytes_per_token_fp32=4 * kv, num_image_tokens=0, encoder_params=sums["encoder"],
        encoder_active_params_per_token=round(active["encoder"]))


def human(n: float, unit: str = "") -> str:
    """1.23B parameters, or with unit="B" decimal bytes: 93.41 GB."""
    big = "B" if unit != "B" else "G"
    for scale, suffix in ((1e12, "T"), (1e9, big), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{' ' if unit else ''}{suffix}{unit}"
    return f"{n:.0f}{' ' if unit else ''}{unit}"


def format_info(info: ModelInfo) -> str:
    if info.encoder_params:
        parts = [("  encoder", human(info.encoder_params)),
                 ("  decoder (+ shared embedding)", human(info.decoder_params))]
        per_input = [("active parameters / encoder token",
                      human(info.encoder_active_params_per_token))]
    else:
        parts = [("  decoder", human(info.decoder_params)),
                 ("  vision tower", human(info.vision_params)),
                 ("  projector", human(info.projector_params))]
        per_input = [("active parameters / image token",
                      human(info.vision_active_params_per_token)),
                     ("image tokens per image", str(info.num_image_tokens))]
    rows = [
        ("total parameters", human(info.total_params)),
        *parts,
        ("routed expert parameters", f"{human(info.routed_expert_params)} "
                                     f"({100 * info.expert_share:.1f}% of total)"),
        ("shared expert parameters", human(info.shared_expert_params)),
        ("active parameters / text token", human(info.active_params_per_token)),
        *per_input,
        ("weights at bf16", human(info.bytes_bf16, "B")),
        ("weights at fp32", human(info.bytes_fp32, "B")),
        ("KV cache / token (bf16)", human(info.kv_bytes_per_token_bf16, "B")),
        ("KV cache / token (fp32)", human(info.kv_bytes_per_token_fp32, "B")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([info.name] + [f"  {k:<{width}}  {v}" for k, v in rows])
