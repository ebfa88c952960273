"""Sparse upcycling: a dense moex model becomes a hard- or soft-MoE model that starts from the
dense model's weights (Komatsuzaki et al. 2022, arXiv 2212.05055; MoE-LLaVA).

    target = upcycle_config(get_config("mini-dense"), UpcycleSpec("hard", experts=4, top_k=2))
    params = upcycle_params(dense_cfg, dense_params, target, seed=0)
    moex upcycle ckpt/llava-1.5-7b ckpt/llava-hard --to hard --experts 4 --top-k 2 --layers even
    moex upcycle ckpt/llava-1.5-7b ckpt/llava-soft --like llava-1.5-7b-soft

Shape letters: D model width, F the dense FFN's width, E experts, P slots per expert. What each
upcycled block starts as, for the dense FFN f (every other parameter is copied unchanged):

  hard (decoder, vision tower, projector)
      E copies of f; router kernel ~ N(0, (noise / sqrt(D))^2): near-uniform logits, the noise
      breaks the tie. With renormalised top-k weights the block computes sum_k w_k f(x) = f(x),
      so the upcycled model's logits equal the dense model's (up to float rounding). Without
      renormalisation it computes (sum of the top-k probabilities) * f(x).
  soft, decoder (causal soft gating, y = sum_e softmax(x W)_e f_e(x))
      f split into E experts of width F / E: expert e holds hidden units e*F/E .. (e+1)*F/E - 1,
      its down projection multiplied by E and the full down bias; router kernel W = 0. The
      uniform gates 1/E then give sum_e (1/E) E f_e(x) = f(x): the dense output, scale 1.
  soft, vision tower / projector (Soft MoE)
      E copies of f as experts; slots mu (D, E, P) ~ N(0, 1/D) (Soft MoE's init), scale 1.
      Every expert being f, the block computes y = C f(D^T x): f applied to the P*E slot mixtures
      of the image's tokens, mixed back per token (D dispatch, C combine weights). With mu = 0
      every slot is the mean token and every token gets f(mean of its image's tokens).

Layers: `UpcycleSpec.layers` (decoder) and `vision_layers` name the blocks to upcycle ("all",
"none", "even", "odd", or indices and ranges "0,2,5-9", "13-23:2"); they become the target's
MoEConfig layer selection (`layer_selection`). Big checkpoints upcycle one params chunk (one
layer) at a time (`upcycle_checkpoint`), so a 7B model never needs two full copies in memory.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Literal

import numpy as np

from moex.config import MoEConfig, VLMConfig
from moex import checkpoint
from moex.model import abstract_params

PARTS = ("decoder", "vision", "projector")


@dataclasses.dataclass(frozen=True)
class UpcycleSpec:
    """What `upcycle_config` builds from a dense config."""

    to: Literal["hard", "soft"]
    experts: int = 4                  # E in the decoder (soft: the dense FFN splits into E)
    top_k: int = 2                    # hard
    layers: str = "all"               # decoder blocks to upcycle
    vision_layers: str = "none"       # vision blocks to upcycle
    vision_experts: int | None = None  # default: experts
    slots: int | None = None          # soft vision: P per expert; default ceil(N tokens / E)
    projector: bool = False           # upcycle the projector MLP too
    renormalize: bool = True          # hard: top-k weights renormalised (exact start)
    noise: float = 0.1                # hard: router logit noise, in units of |x| / sqrt(D)
    name: str | None = None           # target config name (default: SRC-hard / SRC-soft)


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """Block indices from "all", "none", "even", "odd" or a comma list of indices and ranges
    ("0,2,5-9", "13-23:2" = 13, 15, ..., 23)."""
    words = {"all": range(num_layers), "none": range(0), "even": range(0, num_layers, 2),
             "odd": range(1, num_layers, 2)}
    if text.strip() in words:
        return tuple(words[text.strip()])
    out = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            span, _, step = item.partition(":")
            lo, _, hi = span.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1, int(step or 1)))
        except ValueError:
            raise ValueError(f"layers {text!r}: cannot read {item!r}; expected all, none, even, "
                             "odd, or indices and ranges like 0,2,5-9 or 13-23:2") from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"layers {text!r}: {bad} outside the model's {num_layers} blocks")
    return tuple(sorted(out))


def layer_selection(layers, num_layers: int) -> dict:
    """MoEConfig fields (first_k_dense, every_n, layer_offset, dense_layers) whose MoE blocks
    are exactly `layers`: the simplest pattern (smallest every_n, then offset, then first_k),
    else every block but an explicit dense list."""
    want = set(layers)
    for every_n in range(1, num_layers + 1):
        for offset in range(every_n):
            for first_k in range(num_layers + 1):
                got = {i for i in range(num_layers) if i >= first_k and i % every_n == offset}
                if got == want:
                    return dict(first_k_dense=first_k, every_n=every_n, layer_offset=offset,
                                dense_layers=())
    return dict(first_k_dense=0, every_n=1, layer_offset=0,
                dense_layers=tuple(i for i in range(num_layers) if i not in want))


def moe_layers(moe: MoEConfig, num_layers: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers) if moe.is_moe_layer(i))


def _check_dense(cfg: VLMConfig) -> None:
    for part in PARTS:
        sub = getattr(cfg, part)
        if sub is not None and sub.moe.kind != "dense":
            raise ValueError(f"{cfg.name}: upcycling starts from a dense model, but its {part} "
                             f"is already {sub.moe.kind!r} MoE")


def upcycle_config(cfg: VLMConfig, spec: UpcycleSpec) -> VLMConfig:
    """The MoE config that `upcycle_params` fills from dense `cfg`."""
    _check_dense(cfg)
    if spec.to not in ("hard", "soft"):
        raise ValueError(f"upcycle to 'hard' or 'soft', found {spec.to!r}")
    dec = cfg.decoder
    changes = {}
    layers = parse_layers(spec.layers, dec.num_layers)
    if layers:
        if spec.to == "hard":
            moe = MoEConfig(kind="hard", num_experts=spec.experts, top_k=spec.top_k,
                            expert_dim=dec.ffn_dim, renormalize=spec.renormalize)
        else:
            if dec.ffn_dim % spec.experts:
                raise ValueError(f"soft upcycling splits the decoder FFN ({dec.ffn_dim}) into "
                                 f"{spec.experts} experts; {dec.ffn_dim} is not a multiple of "
                                 f"{spec.experts}")
            moe = MoEConfig(kind="soft", num_experts=spec.experts,
                            expert_dim=dec.ffn_dim // spec.experts)
        moe = dataclasses.replace(moe, **layer_selection(layers, dec.num_layers))
        changes["decoder"] = dataclasses.replace(dec, moe=moe)
    vis = cfg.vision
    vlayers = parse_layers(spec.vision_layers, vis.num_layers) if vis is not None else ()
    e_vis = spec.vision_experts or spec.experts
    if vlayers or spec.projector:
        if vis is None:
            raise ValueError(f"{cfg.name} has no vision tower to upcycle")
        if spec.to == "hard":
            vmoe = MoEConfig(kind="hard", num_experts=e_vis, top_k=spec.top_k,
                             expert_dim=vis.mlp_dim, renormalize=spec.renormalize)
        else:
            tokens = vis.num_patches + vis.class_token
            vmoe = MoEConfig(kind="soft", num_experts=e_vis, expert_dim=vis.mlp_dim,
                             soft_slots=spec.slots or math.ceil(tokens / e_vis))
        if vlayers:
            changes["vision"] = dataclasses.replace(
                vis, moe=dataclasses.replace(vmoe, **layer_selection(vlayers, vis.num_layers)))
        if spec.projector:
            pmoe = dataclasses.replace(vmoe, expert_dim=cfg.projector.hidden_dim)
            if spec.to == "soft":
                pmoe = dataclasses.replace(pmoe, soft_slots=spec.slots or math.ceil(
                    vis.num_image_tokens / e_vis))
            changes["projector"] = dataclasses.replace(cfg.projector, moe=pmoe)
    if not changes:
        raise ValueError("nothing to upcycle: no decoder layers, no vision layers, no projector")
    base = cfg.name[:-6] if cfg.name.endswith("-dense") else cfg.name
    return cfg.replace(name=spec.name or f"{base}-{spec.to}",
                       description=f"{cfg.name} upcycled to {spec.to} MoE",
                       **changes).validate()


def like_preset(cfg: VLMConfig, preset: VLMConfig) -> VLMConfig:
    """`cfg` with the MoE layout of `preset` (whose every other shape must equal cfg's)."""
    _check_dense(cfg)
    target = cfg.replace(name=preset.name, description=preset.description,
                         decoder=dataclasses.replace(cfg.decoder, moe=preset.decoder.moe))
    if cfg.vision is not None and preset.vision is not None:
        target = target.replace(vision=dataclasses.replace(cfg.vision, moe=preset.vision.moe),
                                projector=dataclasses.replace(cfg.projector,
                                                              moe=preset.projector.moe))
    differ = [f for f in ("decoder", "vision", "projector")
              if getattr(target, f) != getattr(preset, f)]
    if differ:
        raise ValueError(f"{cfg.name} cannot take {preset.name}'s MoE layout: its {differ} "
                         f"shapes differ from the preset's (compare `moex info` of both)")
    check_upcyclable(cfg, target)
    return target.validate()


def check_upcyclable(src: VLMConfig, dst: VLMConfig) -> None:
    """Raise unless every MoE block of `dst` can start from `src`'s dense FFN: hard and Soft MoE
    experts as wide as the dense FFN (copies), causal soft experts splitting it exactly."""
    for top, block, moe, causal in _ffn_modules(dst):
        part = getattr(src, top)
        width = {"decoder": lambda: part.ffn_dim, "vision": lambda: part.mlp_dim,
                 "projector": lambda: part.hidden_dim}[top]()
        need = (moe.num_experts * moe.expert_dim if moe.kind == "soft" and causal
                else moe.expert_dim)
        if need != width:
            how = (f"{moe.num_experts} soft experts x {moe.expert_dim}" if moe.kind == "soft"
                   and causal else f"experts of width {moe.expert_dim}")
            raise ValueError(f"{dst.name}: {top} {block or ''} has {how}, which cannot start "
                             f"from {src.name}'s dense FFN of width {width}")


# -- params ---------------------------------------------------------------------------------------

def _ffn_modules(dst: VLMConfig):
    """[(top, block name, MoEConfig, causal)] of every FFN block that is MoE in `dst`."""
    out = [("decoder", f"layer_{i}", dst.decoder.moe, True)
           for i in moe_layers(dst.decoder.moe, dst.decoder.num_layers)]
    if dst.vision is not None:
        out += [("vision", f"layer_{i}", dst.vision.moe, False)
                for i in moe_layers(dst.vision.moe, dst.vision.num_layers)]
        if dst.projector.moe.kind != "dense":
            out.append(("projector", "", dst.projector.moe, False))
    return out


def _dense_mlp(block: dict, top: str) -> dict:
    """{up, gate?, down: {kernel, bias?}} of a dense FFN block (the projector names fc1 / fc2)."""
    if top == "projector":
        return {"up": block["fc1"], "down": block["fc2"]}
    return block["ffn"]["mlp"]


def _stack(mlp: dict, e: int) -> dict:
    """E copies of a dense MLP in the stacked expert layout (moex.nn.experts)."""
    rep = lambda a: np.broadcast_to(np.asarray(a), (e,) + np.shape(a)).copy()
    out = {"w_up": rep(mlp["up"]["kernel"]), "w_down": rep(mlp["down"]["kernel"])}
    if "gate" in mlp:
        out["w_gate"] = rep(mlp["gate"]["kernel"])
    for src, dst in (("up", "b_up"), ("gate", "b_gate"), ("down", "b_down")):
        if src in mlp and "bias" in mlp[src]:
            out[dst] = rep(mlp[src]["bias"])
    return out


def _split(mlp: dict, e: int) -> dict:
    """The dense MLP split into E experts of F / E hidden units (expert-inner layout of the causal
    soft block), down projections scaled by E so uniform gates give the dense output."""
    up = np.asarray(mlp["up"]["kernel"])
    d, f = up.shape
    down = np.asarray(mlp["down"]["kernel"])
    scale = np.asarray(e, down.dtype)
    out = {"w_up": up.reshape(d, e, f // e), "w_down": down.reshape(e, f // e, -1) * scale}
    if "gate" in mlp:
        out["w_gate"] = np.asarray(mlp["gate"]["kernel"]).reshape(d, e, f // e)
    for src, dst in (("up", "b_up"), ("gate", "b_gate")):
        if src in mlp and "bias" in mlp[src]:
            out[dst] = np.asarray(mlp[src]["bias"]).reshape(e, f // e)
    if "bias" in mlp["down"]:
        b = np.asarray(mlp["down"]["bias"])
        out["b_down"] = np.broadcast_to(b, (e,) + b.shape).copy()
    return out


def _upcycled_ffn(mlp: dict, moe: MoEConfig, causal: bool, d: int, noise: float, rng) -> dict:
    dtype = np.asarray(mlp["up"]["kernel"]).dtype
    e = moe.num_experts
    if moe.kind == "hard":
        kernel = rng.normal(0.0, noise / math.sqrt(d), (d, e)).astype(dtype)
        return {"experts": _stack(mlp, e), "router": {"kernel": kernel}}
    if causal:
        return {"experts": _split(mlp, e), "router": np.zeros((d, e), dtype)}
    slots = rng.normal(0.0, d ** -0.5, (d, e, moe.soft_slots)).astype(dtype)
    return {"experts": _stack(mlp, e), "slots": slots, "scale": np.ones((), dtype)}


def upcycle_chunk(src: VLMConfig, dst: VLMConfig, top: str, name: str, value, seed: int = 0,
                  noise: float = 0.1):
    """One params chunk (params[top][name], or params[top] when name is "") of dense `src`,
    upcycled to `dst`: MoE blocks are built from the dense FFN, everything else is returned as is."""
    for i, (t, block, moe, causal) in enumerate(_ffn_modules(dst)):
        if t != top or block != name:
            continue
        part = getattr(src, top)
        if part.moe.kind != "dense":
            raise ValueError(f"{src.name}: {top} {name or ''} is not a dense block")
        d = value["fc1"]["kernel"].shape[0] if top == "projector" else \
            np.shape(value["ffn"]["mlp"]["up"]["kernel"])[0]
        rng = np.random.default_rng([seed, PARTS.index(top), i])
        ffn = _upcycled_ffn(_dense_mlp(value, top), moe, causal, d, noise, rng)
        if top == "projector":
            return {"ffn": ffn}
        return {**value, "ffn": ffn}
    return value


def chunks(params):
    """[(top, name, value)]: the second-level subtrees of a params tree (moex.checkpoint's chunks)."""
    for top, sub in params.items():
        if isinstance(sub, dict) and top != "projector":
            for name, value in sub.items():
                yield top, name, value
        else:
            yield top, "", sub


def upcycle_params(src: VLMConfig, params, dst: VLMConfig, seed: int = 0, noise: float = 0.1):
    """Params of MoE config `dst` built from dense `src`'s params (numpy arrays); checked against
    dst's shapes."""
    _check_dense(src)
    check_upcyclable(src, dst)
    out = {}
    for top, name, value in chunks(params):
        new = upcycle_chunk(src, dst, top, name, value, seed, noise)
        if name:
            out.setdefault(top, {})[name] = new
        else:
            out[top] = new
    check_shapes(out, dst)
    return out


def check_shapes(params, cfg: VLMConfig, tops=None) -> None:
    """Every leaf of `params` (restricted to chunks `tops`) has cfg's shape; else a ValueError
    naming the path, expected and found."""
    import jax
    want = abstract_params(cfg)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    keystr = jax.tree_util.keystr
    for path, leaf in flat_got.items():
        if path not in flat_want:
            raise ValueError(f"{cfg.name}: upcycled params hold {keystr(path)}, which the config "
                             "does not have")
        if tuple(np.shape(leaf)) != tuple(flat_want[path].shape):
            raise ValueError(f"{cfg.name}: {keystr(path)} has shape {tuple(np.shape(leaf))}, "
                             f"expected {tuple(flat_want[path].shape)}")
    if tops is None:
        missing = [keystr(p) for p in flat_want if p not in flat_got]
        if missing:
            raise ValueError(f"{cfg.name}: upcycled params lack {missing[:5]}")


def upcycle_checkpoint(src_dir, out, spec: UpcycleSpec | None = None,
                       like: VLMConfig | None = None, seed: int = 0,
                       progress: bool = True) -> pathlib.Path:
    """Upcycle the dense moex checkpoint SRC into OUT, one params chunk at a time, written
    atomically (OUT appears complete or not at all); tokenizer files are copied."""
    from tqdm import tqdm
    src_dir = pathlib.Path(src_dir)
    cfg = checkpoint.load_config(src_dir)
    if (spec is None) == (like is None):
        raise ValueError("give an UpcycleSpec or a preset to take the MoE layout from, not both")
    dst = upcycle_config(cfg, spec) if spec is not None else like_preset(cfg, like)
    noise = spec.noise if spec is not None else UpcycleSpec("hard").noise
    names = checkpoint.chunk_names(src_dir)
    meta = {"upcycled_from": str(src_dir), "source_config": cfg.name,
            "spec": dataclasses.asdict(spec) if spec is not None else {"like": like.name},
            "seed": seed, **{k: v for k, v in checkpoint.metadata(src_dir).items()
                             if k in ("tokenizer", "trained")}}
    # the projector's chunks (projector.fc1, projector.fc2) upcycle together, as one block
    groups = [[c] for c in names if not c.startswith("projector.")]
    groups += [[c for c in names if c.startswith("projector.")]]
    with checkpoint.writer(out, dst, meta, copy_from=src_dir) as write:
        for group in tqdm([g for g in groups if g], desc="upcycle", disable=not progress):
            top, _, name = group[0].partition(".")
            if top == "projector":
                value, name = {c.partition(".")[2]: checkpoint.load_chunk(src_dir, c)
                               for c in group}, ""
            else:
                value = checkpoint.load_chunk(src_dir, group[0])
            new = upcycle_chunk(cfg, dst, top, name, value, seed, noise)
            check_shapes({top: {name: new} if name else new}, dst, tops=(top,))
            for sub, leaf in (new.items() if top == "projector" else [(name, new)]):
                write(f"{top}.{sub}" if sub else top, leaf)
    return pathlib.Path(out)
