"""The `moex` command.

    moex info PRESET [--json]          sizes from shapes: params, active params, bytes, KV bytes
    moex presets                       list the presets
    moex generate PRESET --prompt ...  generate from a randomly initialised (or --seed) preset
        [--offload POLICY --expert-budget X]   ... with experts in host memory (moex.offload)
    moex bench offload [...]           offload policies x expert budgets x batch sizes
    moex lm train|trace ...            byte-level LM on the stdlib corpus; routing traces
    moex predictor train|eval ...      the routing-path predictor (moex.predict)
    moex compare [...]                 dense vs hard-MoE vs soft-MoE throughput and memory
    moex efficiency [...]              the main experiment (= experiments/vlm_efficiency.py)
    moex vlm data OUT | train PRESET   synthetic MMBench / SEED-Bench data; train a preset VLM
    moex vlm trace MODEL --out F       routing traces of a trained VLM on MMBench-format prompts
    moex upcycle SRC OUT --to hard|soft   sparse upcycling of a dense moex checkpoint
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
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    if args.offload:
        engine = _offload_engine(cfg, params, args, ids, mask, images)
        out = engine.generate(ids, mask, images, max_new_tokens=args.max_new_tokens,
                              sampling=sampling)
    else:
        out = generator_for(cfg)(params, ids, mask, images, max_new_tokens=args.max_new_tokens,
                                 sampling=sampling)
    for p, row, n in zip(prompts, out.tokens, out.num_generated):
        print(json.dumps({"prompt": p, "completion": tok.decode(row[:n]),
                          "tokens": row[:n].tolist()}))
    if args.offload:
        engine.calibrate_copy()
        report = engine.report()
        report.pop("per_layer")
        print(json.dumps({"offload": report, **engine.timings}), file=sys.stderr)
    return 0


def _offload_engine(cfg, params, args, ids, mask, images):
    """The offload engine for `moex generate --offload`; `predictive` forecasts from an
    all-resident run: the exact routing of these prompts (oracle) or its frequency prior."""
    from moex.offload.bench import parse_budget, split_policy
    from moex.offload.engine import OffloadEngine
    from moex.offload.forecast import OracleForecast, PriorForecast
    from moex.offload.store import ExpertStore
    policy, forecast = split_policy(args.offload)
    store = ExpertStore.from_params(cfg, params)
    budget = parse_budget(args.expert_budget, store.total_bytes)
    forecaster = None
    if forecast:
        ref = OffloadEngine(cfg, None, "all-resident", store.total_bytes, store=store)
        ref.generate(ids, mask, images, max_new_tokens=args.max_new_tokens)
        trace = ref.trace()
        forecaster = OracleForecast(trace) if forecast == "oracle" else \
            PriorForecast.from_trace(trace)
    return OffloadEngine(cfg, None, policy, budget, forecaster=forecaster, store=store)


def _upcycle(args) -> int:
    from moex.config import get_config
    from moex.upcycle import UpcycleSpec, upcycle_checkpoint
    if args.like:
        if args.to:
            raise ValueError("--like takes the whole MoE layout from a preset; drop --to")
        out = upcycle_checkpoint(args.src, args.out, like=get_config(args.like), seed=args.seed)
    else:
        if not args.to:
            raise ValueError("say what to upcycle to: --to hard or --to soft (or --like PRESET)")
        spec = UpcycleSpec(args.to, experts=args.experts, top_k=args.top_k, layers=args.layers,
                           vision_layers=args.vision_layers, vision_experts=args.vision_experts,
                           slots=args.slots, projector=args.projector, noise=args.noise,
                           name=args.name)
        out = upcycle_checkpoint(args.src, args.out, spec, seed=args.seed)
    from moex.info import format_info, model_info
    from moex import checkpoint
    print(format_info(model_info(checkpoint.load_config(out))))
    print(f"wrote {out}")
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
    p.add_argument("--offload", metavar="POLICY",
                   help="run with experts in host memory under this policy (all-resident, "
                   "on-demand, lru, lfu, pregated, predictive:prior, predictive:oracle); "
                   "offload stats go to stderr as JSON")
    p.add_argument("--expert-budget", default="25%",
                   help="device budget for experts with --offload: '25%%', '0.25' or '64MB'")
    p.set_defaults(fn=_generate)
    from moex.bench import compare
    p = sub.add_parser("compare", help="dense vs hard-MoE vs soft-MoE throughput and memory")
    compare.add_arguments(p)
    p.set_defaults(fn=compare.main)
    from moex.offload import bench as offload_bench
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench",
                                                                        required=True)
    p = bench.add_parser("offload", help="offload policies x expert budgets x batch sizes")
    offload_bench.add_arguments(p)
    p.set_defaults(fn=offload_bench.main)
    from moex.predict.cli import add_commands
    add_commands(sub)
    from moex import train_vlm
    train_vlm.add_commands(sub)
    from moex.bench import efficiency
    p = sub.add_parser("efficiency", help="the main experiment (experiments/vlm_efficiency.py)")
    efficiency.add_arguments(p)
    p.set_defaults(fn=efficiency.main)
    p = sub.add_parser("upcycle", help="sparse upcycling: a dense moex checkpoint -> hard- or "
                       "soft-MoE (experts start from the dense FFN)")
    p.add_argument("src", help="dense moex checkpoint folder")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--to", choices=["hard", "soft"])
    p.add_argument("--like", metavar="PRESET",
                   help="take the MoE layout from a preset with the same shapes "
                        "(e.g. llava-1.5-7b-hard on a converted LLaVA-1.5-7B)")
    p.add_argument("--experts", type=int, default=4,
                   help="decoder experts (soft: the dense FFN splits into this many)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", default="all",
                   help="decoder blocks: all, none, even, odd, or indices / ranges (0,2,5-9, "
                        "13-23:2)")
    p.add_argument("--vision-layers", default="none", help="vision blocks, the same way")
    p.add_argument("--vision-experts", type=int, help="experts in the vision tower "
                   "(default: --experts)")
    p.add_argument("--slots", type=int, help="Soft MoE slots per expert (default: tokens / "
                   "experts, rounded up)")
    p.add_argument("--projector", action="store_true", help="upcycle the projector MLP too")
    p.add_argument("--noise", type=float, default=0.1,
                   help="hard routers: logit noise (|x| / sqrt(D) units) that breaks the tie")
    p.add_argument("--name", help="name of the new config (default: SRC's name -hard / -soft)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_upcycle)
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
