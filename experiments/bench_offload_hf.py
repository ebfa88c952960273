"""`moex bench offload` on a converted HuggingFace Mixtral: a randomly initialised
`MixtralForCausalLM` (transformers, seed 0) is saved with save_pretrained, converted with
checkpoints_convert, and the offload grid runs on the converted checkpoint.

    python experiments/bench_offload_hf.py
    python experiments/bench_offload_hf.py --layers 4 --experts 8 --budgets 50% 25% --repeats 3

Shape (default): hidden 512, 8 layers, 8 heads / 4 KV heads, 8 experts top-2, expert FFN 1024,
vocabulary 512 -- the shape of experiments/bench_moe_forward.py. Everything lands under --out:
hf/ (the HF folder), moex/ (the converted checkpoint) and offload/ (results.csv, results.json,
report.md). Extra arguments are passed to `moex bench offload`.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=1024)
    p.add_argument("--out", default="results/offload_hf")
    args, bench_args = p.parse_known_args(argv)

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from checkpoints_convert.convert import convert
    from moex.cli import main as moex_main

    out = pathlib.Path(args.out)
    hf, converted = out / "hf", out / "moex"
    for d in (hf, converted):
        if d.exists():
            shutil.rmtree(d)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.expert_dim,
                        num_hidden_layers=args.layers, num_attention_heads=8,
                        num_key_value_heads=4, num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k, max_position_embeddings=4096,
                        router_jitter_noise=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    MixtralForCausalLM(cfg).save_pretrained(hf)
    convert(hf, converted, "fp32", progress=False)
    return moex_main(["bench", "offload", "--checkpoint", str(converted),
                      "--out", str(out / "offload"), *bench_args])


if __name__ == "__main__":
    sys.exit(main())
