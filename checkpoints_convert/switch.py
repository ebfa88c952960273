"""Switch Transformers (`SwitchTransformersForConditionalGeneration`) <-> moex EncDecConfig.

    config.json                         moex (moex.config.EncDecConfig, moex.nn.encdec)
    d_model, d_kv, num_heads, d_ff      d_model, head_dim, num_heads, ffn_dim (dense FFNs and
                                        every expert)
    num_layers, num_decoder_layers      encoder_layers, decoder_layers
    num_sparse_{en,de}coder_layers      encoder_moe, decoder_moe (switch_moe: which blocks)
    num_experts, expert_capacity        MoEConfig.num_experts, expert_capacity (per sequence,
                                        padding counted: padding_takes_capacity)
    router_jitter_noise, router_*_coef  router_jitter, aux_loss_weight, z_loss_weight
    relative_attention_*                relative_buckets, relative_max_distance
    tie_word_embeddings                 tie_embeddings (False: an `lm_head` param)
    router_dtype                        accepted; moex routes in float32 whatever it says
Refused, naming the field: dense_act_fn other than 'relu' (Switch v1.1's 'gated-gelu'),
router_bias true.

Keys (what `save_pretrained` writes; E experts, F = d_ff):
    shared.weight (V, D)                                       embed
      and, untied only, {en,de}coder.embed_tokens.weight        (the same values: checked)
    lm_head.weight (V, D), untied only                         lm_head (D, V)
    {en,de}coder.block.0.layer.0.SelfAttention
        .relative_attention_bias.weight (buckets, H)            {en,de}coder/relative_bias
    {stack}.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight   {stack}/layer_{i}/attn/{q,k,v,o}
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}        decoder/layer_{i}/cross_attn/...
    {stack}.block.{i}.layer.{k}.layer_norm.weight              attn_norm (k 0), cross_norm (1),
                                                               ffn_norm (the FFN layer)
    {stack}.block.{i}.layer.{f}.mlp.{wi,wo}.weight             ffn/mlp/{up,down}/kernel
    ... .mlp.router.classifier.weight (E, D)                   ffn/router/kernel (D, E)
    ... .mlp.experts.expert_{j}.{wi,wo}.weight                 ffn/experts/w_up (E, D, F),
                                                               w_down (E, F, D)
    {stack}.final_layer_norm.weight                            {stack}/final_norm/scale
f is 1 in the encoder and 2 in the decoder (after its cross-attention).
"""

from __future__ import annotations

from moex.config import DENSE, EncDecConfig, MoEConfig, switch_moe

from checkpoints_convert.hfconfig import CheckpointError
from checkpoints_convert.mapping import (Rule, copy, heads_in, heads_out, linear, same_tensor,
                                         stacked_linear)

ARCH = "SwitchTransformersForConditionalGeneration"
MODEL_TYPE = "switch_transformers"

# transformers' SwitchTransformersConfig defaults, used where config.json leaves a field out
# (as transformers itself does when it loads the folder)
HF_DEFAULTS = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64,
                   num_layers=12, num_sparse_encoder_layers=3, num_sparse_decoder_layers=3,
                   num_heads=12, num_experts=8, router_jitter_noise=0.01,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   layer_norm_epsilon=1e-6, router_z_loss_coef=0.001,
                   router_aux_loss_coef=0.001, dense_act_fn="relu", pad_token_id=0,
                   eos_token_id=1, tie_word_embeddings=True)

# HF keys with no parameters of their own: the embeddings tied to `shared` (older saves and
# pytorch_model.bin files hold them too), and lm_head when it is tied (when untied it has a rule)
IGNORE = (r"^encoder\.embed_tokens\.weight$", r"^decoder\.embed_tokens\.weight$",
          r"^lm_head\.weight$")


def _field(hf: dict, key: str):
    value = hf.get(key)
    return HF_DEFAULTS[key] if value is None else value


def _step(num_sparse: int, num_layers: int) -> int:
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def hf_sparse_blocks(num_sparse: int, num_layers: int) -> tuple[int, ...]:
    """The blocks transformers makes Switch layers (SwitchTransformersConfig and
    SwitchTransformersStack): step = num_layers // num_sparse (num_layers when num_sparse is 0),
    block i is sparse iff i % step == 1 or step == 1, and none is when step is 0. Note that
    num_sparse = 0 still gives block 1 (the only block of a 1-block stack) an MoE layer."""
    step = _step(num_sparse, num_layers)
    if step == 0:
        return ()
    return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)


def moex_sparse_blocks(moe: MoEConfig, num_layers: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers) if moe.is_moe_layer(i))


# ---------------------------------------------------------------------------------------------
# config.json -> EncDecConfig
# ---------------------------------------------------------------------------------------------

def _check_supported(hf: dict) -> None:
    act = _field(hf, "dense_act_fn")
    if act != "relu":
        raise CheckpointError(
            f"field 'dense_act_fn' {act!r} is not supported: moex's encoder-decoder FFNs are "
            "ReLU (Switch Transformers v1, 'relu'); gated FFNs such as Switch v1.1's "
            "'gated-gelu' have no moex counterpart")
    if hf.get("router_bias"):
        raise CheckpointError("field 'router_bias' true is not supported: moex's Switch router "
                              "has no bias (expected false, as every published Switch "
                              "checkpoint has)")


def _stack_moe(hf: dict, field: str, num_layers: int) -> MoEConfig:
    """The MoEConfig giving the same MoE blocks as transformers builds from `field`."""
    n = _field(hf, field)
    blocks = hf_sparse_blocks(n, num_layers)
    if not blocks:
        return DENSE
    moe = switch_moe(_field(hf, "num_experts"), _field(hf, "d_ff"), num_layers, n,
                     expert_capacity=_field(hf, "expert_capacity"),
                     jitter=float(_field(hf, "router_jitter_noise")),
                     aux_loss_weight=float(_field(hf, "router_aux_loss_coef")),
                     z_loss_weight=float(_field(hf, "router_z_loss_coef")))
    if moex_sparse_blocks(moe, num_layers) != blocks:       # switch_moe and transformers disagree
        raise CheckpointError(f"internal error: {field}={n} over {num_layers} blocks gives MoE "
                              f"blocks {list(blocks)} in transformers but "
                              f"{list(moex_sparse_blocks(moe, num_layers))} in moex")
    return moe


def to_moex(hf: dict) -> EncDecConfig:
    _check_supported(hf)
    enc_layers = _field(hf, "num_layers")
    dec_layers = hf.get("num_decoder_layers") or enc_layers
    pad = hf.get("pad_token_id")
    pad = HF_DEFAULTS["pad_token_id"] if pad is None else pad
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):                 # the first of several stop tokens
        eos = eos[0] if eos else None
    eos = HF_DEFAULTS["eos_token_id"] if eos is None else eos
    start = hf.get("decoder_start_token_id")  # T5 / Switch start from the pad id
    return EncDecConfig(
        ARCH, vocab_size=_field(hf, "vocab_size"), d_model=_field(hf, "d_model"),
        num_heads=_field(hf, "num_heads"), head_dim=_field(hf, "d_kv"), ffn_dim=_field(hf, "d_ff"),
        activation="relu", encoder_layers=enc_layers, decoder_layers=dec_layers,
        relative_buckets=_field(hf, "relative_attention_num_buckets"),
        relative_max_distance=_field(hf, "relative_attention_max_distance"),
        norm_eps=float(_field(hf, "layer_norm_epsilon")),
        tie_embeddings=bool(_field(hf, "tie_word_embeddings")),
        encoder_moe=_stack_moe(hf, "num_sparse_encoder_layers", enc_layers),
        decoder_moe=_stack_moe(hf, "num_sparse_decoder_layers", dec_layers),
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad if start is None else start).validate()


# ---------------------------------------------------------------------------------------------
# key rules
# ---------------------------------------------------------------------------------------------

def _attention(A: str, M: str, heads: int) -> list[Rule]:
    return [Rule((M + x,), (f"{A}{x}.weight",), heads_in(heads)) for x in ("q", "k", "v")] + \
           [Rule((M + "o",), (A + "o.weight",), heads_out(heads))]


def _ffn(moe: MoEConfig, i: int, H: str, M: str) -> list[Rule]:
    """H: the block's FFN layer ('encoder.block.1.layer.1.'); M: 'encoder/layer_1/ffn/'."""
    if not moe.is_moe_layer(i):
        return [Rule((M + "mlp/up/kernel",), (H + "mlp.wi.weight",), linear()),
                Rule((M + "mlp/down/kernel",), (H + "mlp.wo.weight",), linear())]
    E = range(moe.num_experts)
    return [Rule((M + "router/kernel",), (H + "mlp.router.classifier.weight",), linear()),
            Rule((M + "experts/w_up",), tuple(f"{H}mlp.experts.expert_{e}.wi.weight" for e in E),
                 stacked_linear()),
            Rule((M + "experts/w_down",),
                 tuple(f"{H}mlp.experts.expert_{e}.wo.weight" for e in E), stacked_linear())]


def _stack(cfg: EncDecConfig, stack: str) -> list[Rule]:
    decoder = stack == "decoder"
    n = cfg.decoder_layers if decoder else cfg.encoder_layers
    moe = cfg.decoder_moe if decoder else cfg.encoder_moe
    h = cfg.num_heads
    rules = [Rule((f"{stack}/relative_bias",),
                  (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
                  copy()),
             Rule((f"{stack}/final_norm/scale",), (f"{stack}.final_layer_norm.weight",), copy())]
    for i in range(n):
        L, M = f"{stack}.block.{i}.layer.", f"{stack}/layer_{i}/"
        rules.append(Rule((M + "attn_norm/scale",), (L + "0.layer_norm.weight",), copy()))
        rules += _attention(L + "0.SelfAttention.", M + "attn/", h)
        f = 1
        if decoder:
            rules.append(Rule((M + "cross_norm/scale",), (L + "1.layer_norm.weight",), copy()))
            rules += _attention(L + "1.EncDecAttention.", M + "cross_attn/", h)
            f = 2
        rules.append(Rule((M + "ffn_norm/scale",), (f"{L}{f}.layer_norm.weight",), copy()))
        rules += _ffn(moe, i, f"{L}{f}.", M + "ffn/")
    return rules


UNTIED_EMBEDDINGS = ("its encoder and decoder read one input embedding (as Switch / T5 "
                     "checkpoints have it); transformers 5 keeps three copies when "
                     "tie_word_embeddings is false, and these were trained apart")


def rules(cfg: EncDecConfig) -> list[Rule]:
    shared = Rule(("embed",), ("shared.weight",), copy())
    if cfg.tie_embeddings:      # one tensor; transformers ties the stacks' copies and lm_head
        out = [shared]
    else:                       # transformers 5 keeps (and loads) the stacks' copies apart
        out = [Rule(("embed",), ("shared.weight", "encoder.embed_tokens.weight",
                                 "decoder.embed_tokens.weight"),
                    same_tensor(3, UNTIED_EMBEDDINGS), alt=(shared,)),
               Rule(("lm_head",), ("lm_head.weight",), linear())]
    return out + _stack(cfg, "encoder") + _stack(cfg, "decoder")


# ---------------------------------------------------------------------------------------------
# export: EncDecConfig -> config.json
# ---------------------------------------------------------------------------------------------

def _sparse_count(moe: MoEConfig, num_layers: int, where: str, base_value) -> int:
    """The num_sparse_*_layers that makes transformers build moex's MoE blocks (the base
    config's own value when it does)."""
    want = moex_sparse_blocks(moe, num_layers)
    candidates = ([base_value] if isinstance(base_value, int) else []) + \
        list(range(num_layers + 2))
    for n in candidates:
        if n >= 0 and hf_sparse_blocks(n, num_layers) == want:
            return n
    raise CheckpointError(f"{where}: MoE blocks {list(want)} of {num_layers} are not a pattern "
                          "transformers' Switch Transformers builds (every step-th block from "
                          "block 1, or every block)")


def _check_exportable(moe: MoEConfig, cfg: EncDecConfig, where: str) -> None:
    problems = []
    if moe.kind != "hard":
        problems.append(f"kind {moe.kind!r} (expected 'hard' or 'dense')")
    if moe.top_k != 1 or moe.renormalize:
        problems.append("Switch routes top-1 without renormalisation")
    if moe.expert_dim != cfg.ffn_dim:
        problems.append(f"expert_dim {moe.expert_dim} != ffn_dim {cfg.ffn_dim} (Switch experts "
                        "are d_ff wide)")
    if moe.num_shared_experts or moe.num_groups > 1 or moe.routed_scaling != 1.0 \
            or moe.first_k_dense or moe.dense_layers:
        problems.append("shared experts, grouped routing, scaled weights, first_k_dense and "
                        "dense_layers have no Switch counterpart")
    if moe.expert_capacity is not None and not moe.padding_takes_capacity:
        problems.append("a fixed expert_capacity must count padding (padding_takes_capacity)")
    if moe.expert_capacity is None and moe.capacity_factor is not None:
        problems.append("capacity_factor has no Switch counterpart (use expert_capacity)")
    if problems:
        raise CheckpointError(f"{cfg.name}: {where} cannot be exported as Switch Transformers: "
                              + "; ".join(problems))


def _router_fields(cfg: EncDecConfig) -> dict:
    """The fields both stacks share in transformers (num_experts, expert_capacity, jitter and
    loss coefficients), from whichever stacks have MoE blocks; they must agree."""
    moes = [(w, m) for w, m in (("encoder_moe", cfg.encoder_moe),
                                ("decoder_moe", cfg.decoder_moe)) if m.kind != "dense"]
    for where, m in moes:
        _check_exportable(m, cfg, where)
    if not moes:
        return {}
    fields = [dict(num_experts=m.num_experts,
                   # dropless: no sequence of up to max_seq_len tokens drops one
                   expert_capacity=m.expert_capacity or cfg.max_seq_len,
                   router_jitter_noise=m.router_jitter, router_aux_loss_coef=m.aux_loss_weight,
                   router_z_loss_coef=m.z_loss_weight) for _, m in moes]
    if len(fields) == 2 and fields[0] != fields[1]:
        diff = sorted(k for k in fields[0] if fields[0][k] != fields[1][k])
        raise CheckpointError(f"{cfg.name}: transformers' Switch has one {', '.join(diff)} for "
                              f"both stacks; encoder_moe and decoder_moe differ in them")
    return fields[0]


def to_hf(cfg: EncDecConfig, base: dict) -> dict:
    """config.json for `cfg`; `base` (the converted folder's own config.json, or {}) keeps the
    fields moex has no counterpart for (dropout_rate, initializer_factor, ...)."""
    if cfg.activation != "relu":
        raise CheckpointError(f"{cfg.name}: Switch Transformers FFNs are ReLU; found "
                              f"activation {cfg.activation!r}")
    hf = dict(base)
    hf.update(_router_fields(cfg))
    sparse = {s: _sparse_count(getattr(cfg, f"{s}_moe"), layers, f"{s}_moe",
                               base.get(f"num_sparse_{s}_layers"))
              for s, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers))}
    hf.update(
        architectures=[ARCH], model_type=MODEL_TYPE, is_encoder_decoder=True,
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim,
        num_heads=cfg.num_heads, num_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_sparse_encoder_layers=sparse["encoder"], num_sparse_decoder_layers=sparse["decoder"],
        # what transformers derives from the counts (it writes them, and reads them back)
        encoder_sparse_step=_step(sparse["encoder"], cfg.encoder_layers),
        decoder_sparse_step=_step(sparse["decoder"], cfg.decoder_layers),
        router_bias=False, relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        layer_norm_epsilon=cfg.norm_eps, dense_act_fn="relu",
        tie_word_embeddings=cfg.tie_embeddings, pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id)
    return hf
