"""moex checkpoint -> HF folder (safetensors + config.json) that `transformers` loads.

    python -m checkpoints_convert --to-hf MOEX_DIR OUT

Uses the same rule tables as the import, inverted; experts are written in the per-expert hub
layout that `save_pretrained` writes. A checkpoint converted from HF keeps its original
config.json (in moex.json) as the base, so HF -> moex -> HF gives back the same tensors and keys.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from moex import checkpoint
from moex.config import EncDecConfig, VLMConfig

from checkpoints_convert import switch
from checkpoints_convert.archs import ARCHITECTURES
from checkpoints_convert.convert import flat_shapes
from checkpoints_convert.reader import CheckpointError, HFConfig


def infer_architecture(cfg: VLMConfig | EncDecConfig) -> str:
    """The HF architecture that can express a moex config (for moex-native checkpoints);
    switch.to_hf says what an encoder-decoder must be to export."""
    if isinstance(cfg, EncDecConfig):
        return switch.ARCH
    d, m = cfg.decoder, cfg.decoder.moe
    problems = []
    if m.kind == "soft" or (cfg.vision is not None and (cfg.vision.moe.kind != "dense"
                                                        or cfg.projector.moe.kind != "dense")):
        problems.append("soft or vision/projector MoE blocks have no HF counterpart")
    if d.activation != "swiglu" or d.norm != "rms" or d.parallel_block or d.rotary_pct != 1.0:
        problems.append("the decoder must be Llama-style (swiglu, RMSNorm, full RoPE)")
    if problems:
        raise CheckpointError(f"{cfg.name} cannot be exported to a HF architecture: "
                              + "; ".join(problems))
    if cfg.vision is not None and cfg.vision.pos_grid:
        v = cfg.vision
        if not (v.temporal_patch > 1 and v.rope_theta and d.mrope_section and d.qk_norm == "head"
                and (m.kind == "dense" or (m.renormalize and not m.num_shared_experts))):
            raise CheckpointError(f"{cfg.name}: a Qwen3-VL-style tower (pos_grid) exports as "
                                  "Qwen3-VL, which needs temporal patches, 2D RoPE, mrope, "
                                  "per-head q/k norm and renormalised top-k without shared "
                                  "experts")
        return ("Qwen3VLMoeForConditionalGeneration" if m.kind == "hard"
                else "Qwen3VLForConditionalGeneration")
    if cfg.vision is not None:
        return "LlavaForConditionalGeneration"
    if d.attention == "mla" or m.num_groups > 1 or m.routed_scaling != 1.0:
        return "DeepseekV2ForCausalLM"
    if m.kind == "dense":
        return "MistralForCausalLM" if d.sliding_window else "LlamaForCausalLM"
    if m.shared_gate == "sigmoid":
        return "Qwen2MoeForCausalLM"
    if m.num_shared_experts:
        return "DeepseekV2ForCausalLM"
    if d.qk_norm == "head":
        return "Qwen3MoeForCausalLM"
    if d.qk_norm == "full":
        return "OlmoeForCausalLM"
    return "MixtralForCausalLM"


def hf_tensors(cfg: VLMConfig | EncDecConfig, params, arch_name: str, options: dict | None = None
               ) -> dict[str, np.ndarray]:
    """The HF tensors of moex params. options: the architecture's rule options (a converted
    checkpoint's own layout, moex.json 'rules_options')."""
    arch = ARCHITECTURES[arch_name]
    flat = flat_shapes(params)
    tensors = {}
    for rule in arch.rules(cfg, **(options or {})):
        arrays = rule.transform.to_hf([np.asarray(flat[p]) for p in rule.moex])
        tensors.update(zip(rule.hf, arrays))
    return tensors


def base_config(moex_dir: pathlib.Path, meta: dict) -> HFConfig:
    """The original config.json kept in moex.json (a view naming `hf_config.<field>` and the
    file in its errors); empty for moex-native checkpoints."""
    base = meta.get("hf_config") or {}
    if not isinstance(base, dict):
        raise CheckpointError(f"{moex_dir / 'moex.json'}: field 'hf_config' must be an object")
    return HFConfig(base, moex_dir / "moex.json", "hf_config")


def to_hf(moex_dir, out) -> pathlib.Path:
    from safetensors.numpy import save_file
    moex_dir, out = pathlib.Path(moex_dir), pathlib.Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    cfg = checkpoint.load_config(moex_dir)    # configs first: a bad one fails before weights load
    meta = checkpoint.metadata(moex_dir) if (moex_dir / "moex.json").is_file() else {}
    arch_name = meta.get("architecture") or infer_architecture(cfg)
    if arch_name not in ARCHITECTURES:
        raise CheckpointError(f"{moex_dir / 'moex.json'}: architecture {arch_name!r} is not "
                              f"supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    hf_config = ARCHITECTURES[arch_name].to_hf(cfg, base_config(moex_dir, meta))
    hf_config["dtype"] = cfg.param_dtype
    hf_config.pop("torch_dtype", None)
    tensors = hf_tensors(cfg, checkpoint.load(moex_dir, as_numpy=True)[1], arch_name,
                         meta.get("rules_options"))
    tmp = checkpoint.staging_dir(out)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name in checkpoint.TOKENIZER_FILES:
            if (moex_dir / name).is_file():
                shutil.copy2(moex_dir / name, tmp / name)
        checkpoint.publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
