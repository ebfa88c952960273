"""The `moex` command.

    moex info PRESET [--json]          sizes from shapes: params, active params, bytes, KV bytes
    moex presets                       list the presets
    moex generate PRESET --prompt ...  generate from a randomly initialised (or --seed) preset
    moex compare [...]                 dense vs hard-MoE vs soft-MoE throughput and memory
    moex compare-hf SRC [--prompts F]  a converted HF checkpoint against transformers
"""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from moex.info import format_info, model_info
    info = model_info(args.preset)
    print(json.dumps(info.as_dict(), indent=2) if args.json else format_info(info))
    return 0


def _presets(args) -> int:
    from moex.config import PRESETS, get_config
    for name in sorted(PRESETS):
        print(f"{name:<22} {get_config(name).description}")
    return 0


def _generate(args) -> int:
    import jax
    import numpy as np
    from moex.config import get_config
    from moex.generate import Sampling, generator_for
    from moex.model import init_params
    from moex.tokenizer import ByteTokenizer
    cfg = get_config(args.preset)
    if cfg.decoder.vocab_size < 260:
        raise SystemExit(f"{args.preset} has vocabulary {cfg.decoder.vocab_size}; the byte "
                         "tokenizer needs >= 260 (use a tiny-* or small-* preset)")
    tok = ByteTokenizer()
    n_img = cfg.vision.num_image_tokens if cfg.vision else 0
    prompts = args.prompt
    ids, mask = tok.batch(prompts, num_image_tokens=n_img)
    images = None
    if cfg.vision is not None and "<image>" in "".join(prompts):
        v = cfg.vision
        images = jax.random.normal(jax.random.key(args.seed),
                                   (len(prompts), v.image_size, v.image_size, v.channels))
        images = images * np.asarray([["<image>" in p] for p in prompts])[:, :, None, None]
    params = init_params(cfg, args.seed)
    out = generator_for(cfg)(params, ids, mask, images, max_new_tokens=args.max_new_tokens,
                             sampling=Sampling(args.temperature, args.top_p, args.seed))
    for p, row, n in zip(prompts, out.tokens, out.num_generated):
        print(json.dumps({"prompt": p, "completion": tok.decode(row[:n]),
                          "tokens": row[:n].tolist()}))
    return 0


def _compare_hf(args) -> int:
    from checkpoints_convert.compare import main as compare_main
    return compare_main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter and memory summary of a preset, from shapes")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_info)
    sub.add_parser("presets", help="list presets").set_defaults(fn=_presets)
    p = sub.add_parser("generate", help="generate with a (randomly initialised) preset")
    p.add_argument("preset")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat for a batch; '<image>' inserts a (random) image")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_generate)
    from moex.bench import compare
    p = sub.add_parser("compare", help="dense vs hard-MoE vs soft-MoE throughput and memory")
    compare.add_arguments(p)
    p.set_defaults(fn=compare.main)
    p = sub.add_parser("compare-hf", help="logit parity of a HF checkpoint: moex vs transformers")
    p.add_argument("src", help="HuggingFace model folder (config.json + weights)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_compare_hf)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (KeyError, ValueError) as e:
        print(f"moex {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
