"""`moex vlm data | train | trace`: synthetic MMBench / SEED-Bench data, training a preset VLM on
it, and the routing traces of a trained VLM (the `vlm` domain of the predictor and the offload
bench)."""

from __future__ import annotations

import dataclasses
import json

from moex.cli.args import add_fields, from_args
from moex.data.synthetic import SyntheticSpec, write_synthetic
from moex.predict.vlm import trace_benchmark
from moex.train_vlm import VLMTrainConfig, train_vlm


def register(sub) -> None:
    vlm = sub.add_parser("vlm", help="multiple-choice VLM data and training").add_subparsers(
        dest="vlm", required=True)
    p = vlm.add_parser("train", help="train a preset VLM on MMBench-format questions")
    add_fields(p, VLMTrainConfig, positional=("preset",), skip=("init_digest",), help={
        "data": "synthetic data root (written if missing)",
        "train_file": "MMBench-format TSV to train on instead (no caption rows then)",
        "dev_file": "MMBench-format TSV for held-out accuracy",
        "init": "dense moex checkpoint to upcycle to the preset and fine-tune",
        "mesh": "devices to train on, e.g. data=2,expert=4 (axes data, fsdp, tensor, expert; "
                "README: Choosing a mesh); default one device"})
    p.set_defaults(fn=train)

    d = VLMTrainConfig()
    p = vlm.add_parser("trace", help="routing traces of a trained VLM on MMBench-format prompts "
                       "(the vlm domain of moex predictor and moex bench offload)")
    p.add_argument("model", help="moex checkpoint of a hard-MoE VLM (e.g. runs/vlm/mini-hard/model)")
    p.add_argument("--out", required=True, help="trace file (.npz)")
    p.add_argument("--split", default="dev", choices=["train", "dev"],
                   help="synthetic split to take the questions from")
    p.add_argument("--mmbench", help="an MMBench-format TSV instead of the synthetic split")
    p.add_argument("--questions", type=int, default=256, help="how many (0: all)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--data", default=d.data)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--hidden", action="store_true", help="also record every MoE layer's hidden "
                   "states (trace format v3, for `moex predictor train --kind lookahead`)")
    p.set_defaults(fn=trace)

    p = vlm.add_parser("data", help="write the synthetic MMBench / SEED-Bench splits")
    p.add_argument("out")
    add_fields(p, SyntheticSpec, flags={"n_train": "--train", "n_dev": "--dev",
                                        "n_test": "--test"})
    p.set_defaults(fn=data)


def train(args) -> int:
    run = from_args(VLMTrainConfig, args)
    if run.train_file is not None:                 # captions come with synthetic scenes only
        run = dataclasses.replace(run, caption_rate=0.0)
    _, log = train_vlm(run)
    print(json.dumps(log[-1]))
    print(f"model: {run.run_dir / 'model'}")
    return 0


def trace(args) -> int:
    result, n = trace_benchmark(args.model, split=args.split, mmbench=args.mmbench,
                                questions=args.questions, new_tokens=args.new_tokens,
                                batch=args.batch, data=args.data, seed=args.seed,
                                hidden=args.hidden)
    path = result.save(args.out)
    print(f"{path}: {len(result)} tokens of {n} questions, MoE layers {result.moe_layers}")
    return 0


def data(args) -> int:
    for k, v in write_synthetic(args.out, from_args(SyntheticSpec, args)).items():
        print(f"{k}: {v}")
    return 0
