"""The offload grid on a converted HuggingFace Mixtral: a randomly initialised
`MixtralForCausalLM` (transformers, seed 0) is saved with save_pretrained, converted with
checkpoints_convert, and `moex bench offload` runs on the converted checkpoint.

    python experiments/bench_offload_hf.py             # = moex bench offload-hf
    moex bench offload-hf --layers 4 --experts 8 --budgets 50% 25% --repeats 3

Shape (default): hidden 512, 8 layers, 8 heads / 4 KV heads, 8 experts top-2, expert FFN 1024,
vocabulary 512 -- the shape of `moex bench forward`. Everything lands under --out: hf/ (the HF
folder), moex/ (the converted checkpoint) and offload/ (results.csv, results.json, report.md).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

from checkpoints_convert.convert import convert


@dataclasses.dataclass(frozen=True)
class HFMixtralConfig:
    hidden: int = 512
    layers: int = 8
    experts: int = 8
    top_k: int = 2
    expert_dim: int = 1024
    out: str = "results/offload_hf"


def converted_mixtral(shape: HFMixtralConfig) -> pathlib.Path:
    """OUT/hf (a random transformers Mixtral) converted to OUT/moex; returns the latter."""
    import torch                                    # optional dependencies (moex[convert])
    from transformers import MixtralConfig, MixtralForCausalLM
    out = pathlib.Path(shape.out)
    hf, converted = out / "hf", out / "moex"
    for d in (hf, converted):
        if d.exists():
            shutil.rmtree(d)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=512, hidden_size=shape.hidden, intermediate_size=shape.expert_dim,
                        num_hidden_layers=shape.layers, num_attention_heads=8,
                        num_key_value_heads=4, num_local_experts=shape.experts,
                        num_experts_per_tok=shape.top_k, max_position_embeddings=4096,
                        router_jitter_noise=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    MixtralForCausalLM(cfg).save_pretrained(hf)
    return convert(hf, converted, "fp32", progress=False)
