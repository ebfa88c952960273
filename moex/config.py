"""Model configuration: frozen dataclasses and the one registry of named presets.

A VLM is vision tower -> projector -> decoder LM (LLaVA layout). Every block whose MLP may be a
mixture of experts carries a `MoEConfig`; `MoEConfig.kind` says which:
  dense  a plain MLP (the MoE fields are ignored),
  hard   router + top-k experts (Switch / Mixtral / Qwen-MoE / DeepSeek-MoE variants),
  soft   Soft MoE (Puigcerver et al.) in non-causal blocks (vision tower, projector); in the causal
         decoder, per-token dense soft gating (every expert runs on every token, outputs mixed by a
         softmax over experts) -- see ARCHITECTURE.md for why this variant.

LM-only presets (mixtral-8x7b, ...) are VLMConfigs whose `vision` and `projector` are None.

    python -m moex.cli info mixtral-8x7b        # sizes of any preset, from shapes only
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

MoEKind = Literal["dense", "hard", "soft"]
Activation = Literal["swiglu", "gelu", "gelu_tanh", "quick_gelu", "relu"]
NormKind = Literal["rms", "layer"]
TokenizerKind = Literal["byte", "synthetic-words"]


# The expert-compute vocabulary, one word per choice (moex.nn.experts and moex.nn.grouped say
# what each value computes):
COMPUTE = ("auto", "sorted", "gather", "broadcast", "dense")   # MoEConfig.compute
PAIR_COMPUTE = COMPUTE[:4]                  # the routes with per-pair outputs (not 'dense')
GROUPED_MATMUL = ("auto", "ragged_dot", "blocked")              # MoEConfig.grouped_matmul


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """How the MLP of a block is computed. Shapes: E experts, K selected per token, F expert width.

    Layer selection: block i is an MoE block iff kind != 'dense', i >= first_k_dense,
    i % every_n == layer_offset, and i not in dense_layers. (Mixtral: every layer; Qwen1.5-MoE
    `decoder_sparse_step` s: every_n=s, layer_offset=s-1; DeepSeek `first_k_dense_replace`:
    first_k_dense; MoE-LLaVA: every_n=2, layer_offset=0.)
    """

    kind: MoEKind = "dense"
    num_experts: int = 1
    top_k: int = 1
    expert_dim: int = 0                  # F: hidden width of one routed expert
    renormalize: bool = True             # top-k weights renormalised to sum to 1 (Mixtral) or not
    capacity_factor: float | None = None  # None = dropless; else C = ceil(cf * S * K / E) per group
    expert_capacity: int | None = None   # a fixed C per group (Switch checkpoints), over cf
    padding_takes_capacity: bool = False  # padding tokens use capacity (transformers' Switch)
    router_jitter: float = 0.0           # Switch: uniform multiplicative noise on the router's
                                         # input, training only (a "jitter" rng is passed)
    num_shared_experts: int = 0          # always-on experts, fused as one MLP of width n * shared_dim
    shared_dim: int = 0
    shared_gate: Literal["none", "sigmoid"] = "none"  # Qwen2-MoE gates the shared expert
    first_k_dense: int = 0
    every_n: int = 1
    layer_offset: int = 0
    dense_layers: tuple[int, ...] = ()
    soft_slots: int = 1                  # p: slots per expert (Soft MoE)
    aux_loss_weight: float = 0.01        # Switch load-balance loss
    z_loss_weight: float = 0.001         # router z-loss
    routed_scaling: float = 1.0          # DeepSeek-V2 `routed_scaling_factor` on routed weights
    num_groups: int = 1                  # DeepSeek-V2 group-limited greedy: experts in G groups,
    topk_groups: int = 1                 # only the top `topk_groups` groups (by max score) eligible
    compute: str = "auto"                # hard MoE: how routed pairs are computed, one of
                                         # COMPUTE (sorted / gather / broadcast pairs, 'auto'
                                         # picks by shape; 'dense' one-hot einsum; moex.nn.experts)
    grouped_matmul: str = "auto"         # the sorted route's kernel, one of GROUPED_MATMUL
                                         # (moex.nn.grouped)

    def is_moe_layer(self, i: int) -> bool:
        return (self.kind != "dense" and i >= self.first_k_dense
                and i % self.every_n == self.layer_offset and i not in self.dense_layers)

    def validate(self, where: str) -> None:
        if self.compute not in COMPUTE or self.grouped_matmul not in GROUPED_MATMUL:
            raise ValueError(f"{where}: compute must be one of {COMPUTE} and grouped_matmul one "
                             f"of {GROUPED_MATMUL}; found {self.compute!r} and "
                             f"{self.grouped_matmul!r}")
        if self.kind == "dense":
            return
        if self.num_experts < 1 or self.expert_dim < 1:
            raise ValueError(f"{where}: MoE kind {self.kind!r} needs num_experts >= 1 and "
                             f"expert_dim >= 1, found {self.num_experts} and {self.expert_dim}")
        if self.kind == "hard" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{where}: top_k must be in [1, num_experts={self.num_experts}], "
                             f"found {self.top_k}")
        if self.num_experts % self.num_groups or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"{where}: num_experts ({self.num_experts}) must split into "
                             f"num_groups ({self.num_groups}) with 1 <= topk_groups "
                             f"({self.topk_groups}) <= num_groups")
        if self.num_shared_experts and self.shared_dim < 1:
            raise ValueError(f"{where}: {self.num_shared_experts} shared experts need shared_dim >= 1")


DENSE = MoEConfig()


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT / CLIP / SigLIP-style encoder. N = (image_size // patch_size) ** 2 patch tokens."""

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    activation: Activation = "gelu"
    norm_eps: float = 1e-5
    class_token: bool = True      # CLIP prepends a class token; SigLIP does not
    pre_norm: bool = True         # CLIP's `pre_layrnorm` after the embeddings
    post_norm: bool = True        # final LayerNorm (applied only when feature_layer == -1)
    feature_layer: int = -2       # which block's output feeds the projector (LLaVA: -2)
    drop_class_token: bool = True  # LLaVA's "patch" feature select
    patch_bias: bool = False      # CLIP's patch conv has no bias; SigLIP's has one
    # pixel normalisation (x / 255 - mean) / std per channel; CLIP's values, SigLIP uses 0.5 / 0.5
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    spatial_merge: int = 1        # m: each m x m block of patch features becomes one image token
                                  # (concatenated, D * m^2 wide: Qwen2/3-VL's patch merger)
    # Qwen3-VL's tower (moex.nn.vision, "Qwen3-VL"): all three 0 / None / () for ViT / CLIP /
    # SigLIP towers.
    temporal_patch: int = 1       # frames per patch; an image is repeated over them (Qwen3-VL: 2)
    rope_theta: float | None = None   # 2D axial RoPE on (row, column) in attention; None: none
    pos_grid: int = 0             # G > 0: a learned G x G position grid, resampled bilinearly
                                  # (corners aligned) to each image's patch grid, so any image
                                  # whose sides are multiples of patch_size * spatial_merge runs
                                  # (dynamic resolution); 0: one learned embedding per token
    deepstack_layers: tuple[int, ...] = ()  # DeepStack: the outputs of these blocks, merged by
                                  # their own mergers, are added to the outputs of decoder layers
                                  # 0, 1, ... at the image tokens
    moe: MoEConfig = DENSE

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def dynamic(self) -> bool:
        """Images of any size (multiples of patch_size * spatial_merge) run, not only
        image_size x image_size."""
        return self.pos_grid > 0

    @property
    def num_image_tokens(self) -> int:
        """Image tokens of an image_size x image_size image."""
        return self.tokens_for(self.image_size, self.image_size)

    def tokens_for(self, height: int, width: int) -> int:
        """Image tokens of a (height, width) image (pixels)."""
        patches = (height // self.patch_size) * (width // self.patch_size)
        return patches // self.spatial_merge ** 2 + (self.class_token and not self.drop_class_token)

    def check_image_shape(self, shape) -> None:
        """shape (B, H, W, C) of the tower's input; ValueError naming what was expected."""
        side = self.patch_size * self.spatial_merge
        if self.dynamic:
            ok = (len(shape) == 4 and shape[3] == self.channels and shape[1] >= side
                  and shape[2] >= side and not shape[1] % side and not shape[2] % side)
            want = f"(B, H, W, {self.channels}) with H, W multiples of {side}"
        else:
            ok = tuple(shape[1:]) == (self.image_size, self.image_size, self.channels)
            want = f"(B, {self.image_size}, {self.image_size}, {self.channels})"
        if not ok:
            raise ValueError(f"expected images of shape {want}, found {tuple(shape)}")

    def validate(self) -> None:
        side = self.image_size // self.patch_size
        if self.spatial_merge < 1 or side % self.spatial_merge:
            raise ValueError(f"vision.spatial_merge {self.spatial_merge} must divide the patch "
                             f"grid side {side} ({self.image_size} px / {self.patch_size} px)")
        bad = [i for i in self.deepstack_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"vision.deepstack_layers must be block indices in [0, "
                             f"{self.num_layers}), found {list(self.deepstack_layers)}")
        if self.dynamic and self.class_token:
            raise ValueError("vision.pos_grid > 0 (dynamic resolution) has no class token")
        if self.temporal_patch < 1:
            raise ValueError(f"vision.temporal_patch must be >= 1, found {self.temporal_patch}")
        if self.spatial_merge > 1 and self.class_token and not self.drop_class_token:
            raise ValueError("vision.spatial_merge > 1 merges a square grid of patches: drop "
                             "the class token (drop_class_token=True) or use none")
        self.moe.validate("vision.moe")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Two-layer MLP from vision width to decoder width (LLaVA-1.5 `mlp2x_gelu`)."""

    hidden_dim: int = 64
    activation: Activation = "gelu"
    moe: MoEConfig = DENSE


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Causal decoder LM (Llama / Mistral / Mixtral / Qwen-MoE / DeepSeek-MoE / Phi layouts)."""

    vocab_size: int = 272
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None   # default d_model // num_heads
    ffn_dim: int = 128
    activation: Activation = "swiglu"
    norm: NormKind = "rms"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0       # Phi-2 rotates only the first 40% of each head
    qkv_bias: bool = False        # Qwen
    out_bias: bool = False        # Phi
    mlp_bias: bool = False        # Phi
    lm_head_bias: bool = False    # Phi
    parallel_block: bool = False  # Phi: x + attn(ln(x)) + mlp(ln(x))
    qk_norm: Literal["none", "head", "full"] = "none"  # RMSNorm on q, k: per head (Qwen3) or
                                                       # over all heads (OLMoE)
    sliding_window: int | None = None  # Mistral: attend to the last W positions only
    rope_interleaved: bool = False     # rotate (x0, x1) pairs (DeepSeek-V2) instead of halves
    mrope_section: tuple[int, ...] = ()  # multimodal RoPE (Qwen-VL): (t, h, w) frequency counts;
                                         # frequency i rotates by the t, h or w position of the
                                         # token (moex.nn.layers.rope_angles); () plain RoPE
    mrope_interleaved: bool = True     # Qwen3-VL: t, h, w frequencies interleaved; False: in
                                       # three consecutive sections (Qwen2-VL)
    attention: Literal["gqa", "mla"] = "gqa"  # mla: DeepSeek-V2 multi-head latent attention
    q_lora_rank: int | None = None     # MLA: low-rank query (None: full q projection)
    kv_lora_rank: int = 0              # MLA: latent width cached per token
    qk_rope_head_dim: int = 0          # MLA: rotary part of q/k heads (shared k across heads)
    qk_nope_head_dim: int = 0          # MLA: non-rotary part of q/k heads
    v_head_dim: int = 0                # MLA: value head width
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    moe: MoEConfig = DENSE

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def validate(self) -> None:
        if self.attention == "mla" and min(self.kv_lora_rank, self.qk_rope_head_dim,
                                           self.qk_nope_head_dim, self.v_head_dim) < 1:
            raise ValueError("attention='mla' needs kv_lora_rank, qk_rope_head_dim, "
                             "qk_nope_head_dim and v_head_dim >= 1")
        if self.mrope_section and (len(self.mrope_section) != 3 or
                                   sum(self.mrope_section) != self.dim_per_head // 2):
            raise ValueError(f"mrope_section must be 3 frequency counts (t, h, w) summing to "
                             f"head_dim / 2 = {self.dim_per_head // 2}, found "
                             f"{list(self.mrope_section)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        self.moe.validate("decoder.moe")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """A full model. `vision`/`projector` None means a text-only LM."""

    name: str
    decoder: DecoderConfig
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    dtype: str = "float32"        # compute dtype ("float32" | "bfloat16")
    param_dtype: str = "float32"
    image_token_id: int = 259     # placeholder id (byte tokenizer); converted models override
    pad_token_id: int = 256
    eos_token_id: int = 258
    tokenizer: TokenizerKind = "byte"   # without a tokenizer.json: moex.data.vocab.tokenizer_for
    description: str = ""

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    def validate(self) -> "VLMConfig":
        self.decoder.validate()
        if (self.vision is None) != (self.projector is None):
            raise ValueError(f"{self.name}: vision and projector must both be set or both be None")
        if self.vision is not None:
            self.vision.validate()
            self.projector.moe.validate("projector.moe")
            if self.vision.moe.kind == "soft" and self.vision.moe.soft_slots < 1:
                raise ValueError("vision.moe.soft_slots must be >= 1")
        return self

    def replace(self, **changes) -> "VLMConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "VLMConfig":
        raw = json.loads(text)
        return config_from_dict(raw)


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
    """An encoder-decoder LM in the T5 / Switch Transformers layout (moex.nn.encdec): shared
    embeddings, pre-norm blocks with T5 layer norm (RMS, no bias), attention without biases or
    1/sqrt(d) scaling and with relative position buckets (one table per stack, in its first
    block), ReLU FFNs of which every `step`-th is a Switch MoE (top-1, capacity), cross-attention
    from every decoder block to the encoder's output. `encoder_moe` / `decoder_moe` select the
    MoE blocks of each stack (MoEConfig.is_moe_layer; Switch: every_n=2, layer_offset=1)."""

    name: str
    vocab_size: int = 32128
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64                   # T5's d_kv
    ffn_dim: int = 3072                  # d_ff of the dense FFNs and of every expert
    activation: Activation = "relu"
    encoder_layers: int = 12
    decoder_layers: int = 12
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = True          # tied: logits = (x * d_model**-0.5) @ embed.T
    encoder_moe: MoEConfig = DENSE
    decoder_moe: MoEConfig = DENSE
    max_seq_len: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    tokenizer: TokenizerKind = "byte"
    description: str = ""
    kind: Literal["encdec"] = "encdec"   # written to config.json: which config class reads it
    vision = None                        # (class attributes, not fields) text only: no image
    image_token_id = -1                  # tower, no placeholder id

    def validate(self) -> "EncDecConfig":
        if self.activation != "relu":
            raise ValueError(f"{self.name}: encoder-decoder FFNs are ReLU (Switch "
                             f"Transformers); found activation {self.activation!r}")
        for where, moe in (("encoder_moe", self.encoder_moe), ("decoder_moe", self.decoder_moe)):
            moe.validate(where)
            if moe.kind == "soft":
                raise ValueError(f"{self.name}: {where} must be dense or hard, found soft")
        for n in ("d_model", "num_heads", "head_dim", "ffn_dim", "encoder_layers",
                  "decoder_layers", "relative_buckets", "relative_max_distance"):
            if getattr(self, n) < 1:
                raise ValueError(f"{self.name}: {n} must be >= 1, found {getattr(self, n)}")
        return self

    def replace(self, **changes) -> "EncDecConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "EncDecConfig":
        return config_from_dict(json.loads(text))

    def moe_layers(self) -> list[tuple[str, int]]:
        """(stack, block index) of every MoE block, encoder first: the order of traces and of
        the offload engine's layer visits."""
        return ([("encoder", i) for i in range(self.encoder_layers)
                 if self.encoder_moe.is_moe_layer(i)]
                + [("decoder", i) for i in range(self.decoder_layers)
                   if self.decoder_moe.is_moe_layer(i)])


def switch_moe(num_experts: int, expert_dim: int, num_layers: int, sparse_layers: int,
               expert_capacity: int | None = 64, jitter: float = 0.01,
               aux_loss_weight: float = 0.001, z_loss_weight: float = 0.001) -> MoEConfig:
    """The MoE blocks of a Switch Transformers stack as transformers builds them: step =
    num_layers // sparse_layers (num_layers when sparse_layers is 0, which transformers means as
    "none" but which still makes block 1 sparse), block i sparse iff i % step == 1 (every block
    when step is 1; none when step is 0); top-1 without renormalisation, a fixed capacity per
    sequence counting padding, multiplicative router jitter in training."""
    step = num_layers // sparse_layers if sparse_layers > 0 else num_layers
    if step <= 0:
        return DENSE
    return MoEConfig(kind="hard", num_experts=num_experts, top_k=1, expert_dim=expert_dim,
                     renormalize=False, expert_capacity=expert_capacity,
                     padding_takes_capacity=True, router_jitter=jitter, every_n=step,
                     layer_offset=1 % step, aux_loss_weight=aux_loss_weight,
                     z_loss_weight=z_loss_weight)


AnyConfig = VLMConfig | EncDecConfig


def require_decoder_lm(cfg, what: str) -> VLMConfig:
    """`cfg` if it is a decoder LM / VLM config; an encoder-decoder is refused by name (the
    commands that take one: info, presets, generate, convert, compare-hf)."""
    if isinstance(cfg, EncDecConfig):
        raise ValueError(f"{cfg.name} is an encoder-decoder (Switch / T5 layout); {what} runs "
                         "decoder LMs and VLMs only")
    return cfg


# MoE field -> {value older moex wrote: today's value}. compute "ragged" (sorted pairs, or for
# few tokens gathered / broadcast ones, chosen by shape) is today's "auto".
LEGACY_MOE_VALUES = {"compute": {"ragged": "auto"}}


def upgrade_moe_fields(moe: dict) -> dict:
    """The fields of a MoEConfig dict as written by any moex version, in today's values."""
    out = dict(moe)
    for field, renamed in LEGACY_MOE_VALUES.items():
        if out.get(field) in renamed:
            out[field] = renamed[out[field]]
    return out


def config_from_dict(raw: dict) -> VLMConfig | EncDecConfig:
    """Inverse of dataclasses.asdict for VLMConfig and EncDecConfig (by `kind`; tuples
    restored, unknown keys rejected, MoE values of older moex versions mapped by
    LEGACY_MOE_VALUES)."""

    def build(cls, d):
        if d is None:
            return None
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; expected a subset "
                             f"of {sorted(names)}")
        kw = {}
        for k, v in d.items():
            if k in ("moe", "encoder_moe", "decoder_moe"):
                v = build(MoEConfig, upgrade_moe_fields(v))
            elif k in ("dense_layers", "image_mean", "image_std", "deepstack_layers",
                       "mrope_section"):
                v = tuple(v)
            kw[k] = v
        return cls(**kw)

    if raw.get("kind") == "encdec":
        return build(EncDecConfig, raw).validate()
    return VLMConfig(
        name=raw["name"],
        decoder=build(DecoderConfig, raw["decoder"]),
        vision=build(VisionConfig, raw.get("vision")),
        projector=build(ProjectorConfig, raw.get("projector")),
        dtype=raw.get("dtype", "float32"),
        param_dtype=raw.get("param_dtype", "float32"),
        description=raw.get("description", ""),
        **{k: raw[k] for k in ("image_token_id", "pad_token_id", "eos_token_id", "tokenizer")
           if k in raw},
    ).validate()


# ----------------------------------------------------------------------------------------------
# Presets. One registry; each entry is a function so that presets can derive from each other.
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, callable] = {}


def preset(name: str):
    def register(fn):
        PRESETS[name] = fn
        return fn
    return register


def get_config(name: str) -> VLMConfig | EncDecConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]().validate()


# --- test size: seconds on CPU ----------------------------------------------------------------
# Active MLP parameters per token are matched across the three: dense FFN 128; hard 4 experts x 64,
# top-2; soft decoder 4 experts x 32 all active; soft vision: n*p slots == N tokens with experts as
# wide as the dense MLP, so each token costs one expert's MLP.

_TINY_VISION = VisionConfig(image_size=32, patch_size=8, d_model=64, num_layers=2, num_heads=4,
                            mlp_dim=128)
_TINY_DECODER = DecoderConfig(vocab_size=272, d_model=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, ffn_dim=128, max_seq_len=1024)


@preset("tiny-dense")
def _tiny_dense():
    return VLMConfig("tiny-dense", _TINY_DECODER, _TINY_VISION, ProjectorConfig(hidden_dim=64),
                     description="test-size dense VLM")


@preset("tiny-hard")
def _tiny_hard():
    moe = MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=64)
    vmoe = dataclasses.replace(moe, every_n=2, layer_offset=1)
    return VLMConfig("tiny-hard", dataclasses.replace(_TINY_DECODER, moe=moe),
                     dataclasses.replace(_TINY_VISION, moe=vmoe), ProjectorConfig(hidden_dim=64),
                     description="test-size hard-MoE VLM (4 experts, top-2)")


@preset("tiny-soft")
def _tiny_soft():
    dec = MoEConfig(kind="soft", num_experts=4, expert_dim=32)
    # 16 patch tokens + class token = 17 per image; 4 experts x 4 slots = 16 slots.
    vis = MoEConfig(kind="soft", num_experts=4, expert_dim=128, soft_slots=4, every_n=2,
                    layer_offset=1)
    return VLMConfig("tiny-soft", dataclasses.replace(_TINY_DECODER, moe=dec),
                     dataclasses.replace(_TINY_VISION, moe=vis), ProjectorConfig(hidden_dim=64),
                     description="test-size soft-MoE VLM")


# --- benchmark size on CPU --------------------------------------------------------------------
# Decoder: d 512, 8 layers, 8 heads / 4 KV heads, vocabulary 512 (byte tokenizer + specials,
# padded). Active MLP width per token 1024 in all three: dense 1024; hard 8 experts x 512 top-2;
# soft 8 experts x 128, all active. Vision: 64x64 images, 8x8 patches -> 64 tokens, d 256, 4 layers.
# Soft vision: 8 experts x 8 slots = 64 slots for 65 tokens, experts as wide as the dense MLP.

_SMALL_VISION = VisionConfig(image_size=64, patch_size=8, d_model=256, num_layers=4, num_heads=4,
                             mlp_dim=1024)
_SMALL_DECODER = DecoderConfig(vocab_size=512, d_model=512, num_layers=8, num_heads=8,
                               num_kv_heads=4, ffn_dim=1024, max_seq_len=4096)
_SMALL_PROJ = ProjectorConfig(hidden_dim=512)


@preset("small-dense")
def _small_dense():
    return VLMConfig("small-dense", _SMALL_DECODER, _SMALL_VISION, _SMALL_PROJ,
                     description="CPU benchmark-size dense VLM")


@preset("small-hard")
def _small_hard():
    moe = MoEConfig(kind="hard", num_experts=8, top_k=2, expert_dim=512)
    vmoe = MoEConfig(kind="hard", num_experts=8, top_k=2, expert_dim=512, every_n=2,
                     layer_offset=1)
    return VLMConfig("small-hard", dataclasses.replace(_SMALL_DECODER, moe=moe),
                     dataclasses.replace(_SMALL_VISION, moe=vmoe), _SMALL_PROJ,
                     description="CPU benchmark-size hard-MoE VLM (8 experts, top-2)")


@preset("small-soft")
def _small_soft():
    dec = MoEConfig(kind="soft", num_experts=8, expert_dim=128)
    vis = MoEConfig(kind="soft", num_experts=8, expert_dim=1024, soft_slots=8, every_n=2,
                    layer_offset=1)
    return VLMConfig("small-soft", dataclasses.replace(_SMALL_DECODER, moe=dec),
                     dataclasses.replace(_SMALL_VISION, moe=vis), _SMALL_PROJ,
                     description="CPU benchmark-size soft-MoE VLM")


# --- learning size on CPU: the main job trains these -------------------------------------------
# Sized with the task (moex.data.synthetic) and its word tokenizer (moex.data.vocab, 65 words):
# 48 px images in 8 px patches -> 36 image tokens, plus ~30-40 text tokens per question, and ~1M
# parameters, small enough to train on 2 CPU cores. The vision tower feeds the projector from its
# last block (feature_layer -1), so its MoE blocks run.
# mini-hard and mini-soft are mini-dense sparsely upcycled (moex.upcycle; `moex upcycle
# runs/vlm/mini-dense/model OUT --like mini-hard`): hard = 4 copies of each decoder FFN, top-2
# renormalised, and 4 copies of the odd vision MLPs; soft = each decoder FFN split into 4
# soft-gated experts of 1/4 the width (active parameters match dense), and Soft MoE in the odd
# vision blocks (4 copies of the MLP x 9 slots = 36 slots for 36 tokens).

_MINI_VISION = VisionConfig(image_size=48, patch_size=8, d_model=128, num_layers=4, num_heads=4,
                            mlp_dim=256, class_token=False, drop_class_token=False,
                            feature_layer=-1)
_MINI_DECODER = DecoderConfig(vocab_size=80, d_model=128, num_layers=4, num_heads=4,
                              num_kv_heads=2, ffn_dim=256, max_seq_len=512)
_MINI_WORDS = dict(tokenizer="synthetic-words", image_token_id=4, pad_token_id=0, eos_token_id=2)


@preset("mini-dense")
def _mini_dense():
    return VLMConfig("mini-dense", _MINI_DECODER, _MINI_VISION, ProjectorConfig(hidden_dim=128),
                     description="dense VLM sized to learn the synthetic benchmark on 2 CPU cores",
                     **_MINI_WORDS)


@preset("mini-hard")
def _mini_hard():
    moe = MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=256)
    vmoe = dataclasses.replace(moe, every_n=2, layer_offset=1)
    return _mini_dense().replace(
        name="mini-hard", decoder=dataclasses.replace(_MINI_DECODER, moe=moe),
        vision=dataclasses.replace(_MINI_VISION, moe=vmoe),
        description="mini-dense upcycled: 4 experts top-2 (decoder; odd vision blocks)")


@preset("mini-soft")
def _mini_soft():
    dec = MoEConfig(kind="soft", num_experts=4, expert_dim=64)
    vis = MoEConfig(kind="soft", num_experts=4, expert_dim=256, soft_slots=9, every_n=2,
                    layer_offset=1)
    return _mini_dense().replace(
        name="mini-soft", decoder=dataclasses.replace(_MINI_DECODER, moe=dec),
        vision=dataclasses.replace(_MINI_VISION, moe=vis),
        description="mini-dense upcycled: soft-gated split decoder FFNs, Soft MoE vision")


# --- published scale ---------------------------------------------------------------------------

CLIP_L14_336 = VisionConfig(image_size=336, patch_size=14, d_model=1024, num_layers=24,
                            num_heads=16, mlp_dim=4096, activation="quick_gelu", norm_eps=1e-5,
                            class_token=True, pre_norm=True, post_norm=True, feature_layer=-2,
                            drop_class_token=True)
SIGLIP_SO400M_384 = VisionConfig(image_size=384, patch_size=14, d_model=1152, num_layers=27,
                                 num_heads=16, mlp_dim=4304, activation="gelu_tanh",
                                 norm_eps=1e-6, class_token=False, pre_norm=False, post_norm=True,
                                 feature_layer=-1, drop_class_token=False, patch_bias=True,
                                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
LLAMA2_7B = DecoderConfig(vocab_size=32064, d_model=4096, num_layers=32, num_heads=32,
                          num_kv_heads=32, ffn_dim=11008, norm_eps=1e-5, max_seq_len=4096)


@preset("llava-1.5-7b")
def _llava_7b():
    return VLMConfig("llava-1.5-7b", LLAMA2_7B, CLIP_L14_336,
                     ProjectorConfig(hidden_dim=4096, activation="gelu"),
                     dtype="bfloat16", param_dtype="bfloat16",
                     description="LLaVA-1.5-7B: CLIP ViT-L/14-336 + 2-layer GELU MLP + Llama-2-7B")


@preset("llava-1.5-7b-hard")
def _llava_7b_hard():
    # MoE-LLaVA's recipe applied to LLaVA-1.5-7B: sparse upcycling of every second decoder FFN
    # (layers 0, 2, ..., 30) into 4 copies, top-2 with renormalisation. Active compute per token
    # is then dense + one FFN per MoE layer; the vision tower stays dense as in MoE-LLaVA.
    moe = MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=11008, every_n=2,
                    layer_offset=0)
    base = _llava_7b()
    return base.replace(name="llava-1.5-7b-hard", decoder=dataclasses.replace(LLAMA2_7B, moe=moe),
                        description="hard-MoE LLaVA-1.5-7B: 4 experts top-2 every 2nd decoder layer")


@preset("llava-1.5-7b-soft")
def _llava_7b_soft():
    # Soft MoE where it is defined without causality: the vision tower. Following Soft MoE-L/16,
    # the last half of the blocks (12..23) alternate to Soft MoE (6 layers), 64 experts as wide as
    # the CLIP MLP with 9 slots each: 576 slots for 577 tokens, so compute per image matches the
    # dense tower while parameters grow 64x in those MLPs. The decoder keeps the dense FFN budget
    # split into 4 soft-gated experts of 2752 (every 2nd layer), so decoder active params match
    # the dense model.
    vis = MoEConfig(kind="soft", num_experts=64, expert_dim=4096, soft_slots=9, first_k_dense=12,
                    every_n=2, layer_offset=1)
    dec = MoEConfig(kind="soft", num_experts=4, expert_dim=2752, every_n=2, layer_offset=0)
    base = _llava_7b()
    return base.replace(name="llava-1.5-7b-soft",
                        vision=dataclasses.replace(CLIP_L14_336, moe=vis),
                        decoder=dataclasses.replace(LLAMA2_7B, moe=dec),
                        description="soft-MoE LLaVA-1.5-7B: Soft MoE vision tower, soft-gated decoder")


@preset("moe-llava-phi2-4e")
def _moe_llava_phi2():
    moe = MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=10240, every_n=2,
                    layer_offset=0)
    phi2 = DecoderConfig(vocab_size=51200, d_model=2560, num_layers=32, num_heads=32,
                         num_kv_heads=32, ffn_dim=10240, activation="gelu_tanh", norm="layer",
                         norm_eps=1e-5, rotary_pct=0.4, qkv_bias=True, out_bias=True,
                         mlp_bias=True, lm_head_bias=True, parallel_block=True,
                         max_seq_len=2048, moe=moe)
    return VLMConfig("moe-llava-phi2-4e", phi2, CLIP_L14_336,
                     ProjectorConfig(hidden_dim=2560, activation="gelu"),
                     dtype="bfloat16", param_dtype="bfloat16",
                     description="MoE-LLaVA-Phi2-2.7B-4e: CLIP-L/14-336 + Phi-2 with 4 experts top-2")


@preset("deepseek-vl2-tiny")
def _deepseek_vl2_tiny():
    moe = MoEConfig(kind="hard", num_experts=64, top_k=6, expert_dim=896, renormalize=False,
                    num_shared_experts=2, shared_dim=896, first_k_dense=1)
    lm = DecoderConfig(vocab_size=129280, d_model=1280, num_layers=12, num_heads=10,
                       num_kv_heads=10, ffn_dim=6848, norm_eps=1e-6, max_seq_len=4096, moe=moe)
    return VLMConfig("deepseek-vl2-tiny", lm, SIGLIP_SO400M_384,
                     ProjectorConfig(hidden_dim=1280, activation="gelu"),
                     dtype="bfloat16", param_dtype="bfloat16",
                     description="DeepSeek-VL2-Tiny (approximate: SigLIP-SO400M-384, no tiling / "
                                 "pixel-shuffle; 64+2 experts top-6, MHA)")


@preset("mixtral-8x7b")
def _mixtral():
    moe = MoEConfig(kind="hard", num_experts=8, top_k=2, expert_dim=14336)
    lm = DecoderConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       ffn_dim=14336, norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768, moe=moe)
    return VLMConfig("mixtral-8x7b", lm, dtype="bfloat16", param_dtype="bfloat16",
                     description="Mixtral-8x7B: 8 experts top-2, renormalised")


@preset("qwen1.5-moe-a2.7b")
def _qwen_moe():
    moe = MoEConfig(kind="hard", num_experts=60, top_k=4, expert_dim=1408, renormalize=False,
                    num_shared_experts=1, shared_dim=5632, shared_gate="sigmoid")
    lm = DecoderConfig(vocab_size=151936, d_model=2048, num_layers=24, num_heads=16,
                       num_kv_heads=16, ffn_dim=5632, norm_eps=1e-6, rope_theta=1e6,
                       qkv_bias=True, max_seq_len=8192, moe=moe)
    return VLMConfig("qwen1.5-moe-a2.7b", lm, dtype="bfloat16", param_dtype="bfloat16",
                     description="Qwen1.5-MoE-A2.7B: 60 experts top-4 + sigmoid-gated shared expert")


@preset("deepseek-moe-16b")
def _deepseek_moe():
    moe = MoEConfig(kind="hard", num_experts=64, top_k=6, expert_dim=1408, renormalize=False,
                    num_shared_experts=2, shared_dim=1408, first_k_dense=1)
    lm = DecoderConfig(vocab_size=102400, d_model=2048, num_layers=28, num_heads=16,
                       num_kv_heads=16, ffn_dim=10944, norm_eps=1e-6, max_seq_len=4096, moe=moe)
    return VLMConfig("deepseek-moe-16b", lm, dtype="bfloat16", param_dtype="bfloat16",
                     description="DeepSeek-MoE-16B: 64 routed + 2 shared experts, top-6, first layer dense")


# Qwen3-VL's published shapes (config.json of Qwen/Qwen3-VL-8B-Instruct and
# Qwen/Qwen3-VL-30B-A3B-Instruct; REFERENCES.md), the same vision tower in both: 27 blocks of
# width 1152 over 16 px patches of 2 frames, a 48 x 48 learned position grid (so image_size 768
# is its native size; any multiple of 32 px runs), 2D RoPE, patch merger 2 x 2 -> 4608 -> the
# decoder width, DeepStack taps after blocks 8, 16 and 24 into decoder layers 0-2; decoders with
# per-head q/k norm and interleaved MRoPE (24, 20, 20) at theta 5e6.
QWEN3_VL_VISION = VisionConfig(image_size=768, patch_size=16, d_model=1152, num_layers=27,
                               num_heads=16, mlp_dim=4304, activation="gelu_tanh",
                               norm_eps=1e-6, class_token=False, pre_norm=False,
                               post_norm=True, feature_layer=-1, drop_class_token=False,
                               patch_bias=True, spatial_merge=2, temporal_patch=2,
                               rope_theta=10000.0, pos_grid=48, deepstack_layers=(8, 16, 24),
                               image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
_QWEN3_VL_IDS = dict(image_token_id=151655, pad_token_id=151643, eos_token_id=151645)


@preset("qwen3-vl-8b")
def _qwen3_vl_8b():
    lm = DecoderConfig(vocab_size=151936, d_model=4096, num_layers=36, num_heads=32,
                       num_kv_heads=8, head_dim=128, ffn_dim=12288, norm_eps=1e-6,
                       rope_theta=5e6, qk_norm="head", mrope_section=(24, 20, 20),
                       max_seq_len=262144)
    return VLMConfig("qwen3-vl-8b", lm, QWEN3_VL_VISION,
                     ProjectorConfig(hidden_dim=4608, activation="gelu"),
                     dtype="bfloat16", param_dtype="bfloat16", **_QWEN3_VL_IDS,
                     description="Qwen3-VL-8B: dense, 36 layers; DeepStack, interleaved MRoPE")


@preset("qwen3-vl-30b-a3b")
def _qwen3_vl_30b():
    moe = MoEConfig(kind="hard", num_experts=128, top_k=8, expert_dim=768, renormalize=True)
    lm = DecoderConfig(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32,
                       num_kv_heads=4, head_dim=128, ffn_dim=6144, norm_eps=1e-6,
                       rope_theta=5e6, qk_norm="head", mrope_section=(24, 20, 20),
                       max_seq_len=262144, moe=moe)
    return VLMConfig("qwen3-vl-30b-a3b", lm, QWEN3_VL_VISION,
                     ProjectorConfig(hidden_dim=4608, activation="gelu"),
                     dtype="bfloat16", param_dtype="bfloat16", **_QWEN3_VL_IDS,
                     description="Qwen3-VL-30B-A3B: 48 layers, 128 experts top-8; DeepStack, "
                                 "interleaved MRoPE")


# --- Switch Transformers (T5 encoder-decoder, ExpertFlow's own models) ----------------------------
# google/switch-base-E: T5-base shapes (12 + 12 blocks, d 768, 12 heads of 64, d_ff 3072, ReLU,
# vocabulary 32128, relative buckets 32 up to 128), every second block of each stack (1, 3, ...)
# a Switch layer of E experts, top-1 with expert_capacity 64 per sequence.

def _switch_base(experts: int) -> EncDecConfig:
    moe = switch_moe(experts, 3072, 12, 6)
    return EncDecConfig(f"switch-base-{experts}", encoder_moe=moe, decoder_moe=moe,
                        description=f"Switch Transformers base, {experts} experts (T5-base "
                                    "encoder-decoder, top-1 Switch layer every 2nd block)")


for _e in (8, 16, 32, 64, 128):
    preset(f"switch-base-{_e}")(lambda e=_e: _switch_base(e))


@preset("tiny-switch")
def _tiny_switch():
    moe = switch_moe(4, 96, 4, 2, expert_capacity=None)
    return EncDecConfig("tiny-switch", vocab_size=272, d_model=64, num_heads=4, head_dim=16,
                        ffn_dim=96, encoder_layers=4, decoder_layers=4, relative_buckets=16,
                        relative_max_distance=64, encoder_moe=moe, decoder_moe=moe,
                        pad_token_id=256, eos_token_id=258, decoder_start_token_id=257,
                        description="test size: Switch encoder-decoder, 4 + 4 blocks, 4 experts "
                                    "top-1 in blocks 1 and 3 of each stack (byte tokenizer)")


@preset("small-switch")
def _small_switch():
    moe = switch_moe(32, 256, 6, 3, expert_capacity=None)
    return EncDecConfig("small-switch", vocab_size=272, d_model=128, num_heads=4, head_dim=32,
                        ffn_dim=256, encoder_layers=6, decoder_layers=6, encoder_moe=moe,
                        decoder_moe=moe, pad_token_id=256, eos_token_id=258,
                        decoder_start_token_id=257,
                        description="CPU size: Switch encoder-decoder, 6 + 6 blocks of d 128, "
                                    "32 experts top-1 in blocks 1, 3, 5 of each stack (as "
                                    "Switch-32), byte tokenizer; trained by moex lm train")
