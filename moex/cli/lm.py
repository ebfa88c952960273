"""`moex lm train | trace` and `moex predictor train | eval | study`: the small models' decoders as
byte-level LMs on the stdlib corpus, their routing traces, and the routing-path predictor.

    moex lm train small-hard --steps 400                  # -> runs/lm/small-hard/model
    moex lm trace runs/lm/small-hard/model --domain code --split train --out traces/code.npz
    moex predictor train traces/code.npz --out runs/rpp/code
    moex predictor eval runs/rpp/code traces/code-heldout.npz traces/prose-heldout.npz \\
        --prior-trace traces/code.npz --out results/rpp
    moex predictor study                                  # = experiments/routing_predictor.py
"""

from __future__ import annotations

import json
import pathlib

from moex import checkpoint
from moex.cli.args import add_fields, from_args
from moex.experiments.routing_predictor import StudyConfig, study
from moex.predict.evaluate import evaluate_predictor, markdown
from moex.predict.lm import LMTrainConfig, record_traces, train_lm
from moex.predict.train import PredictorShape, PredictorTrainConfig, train_from_trace


def register(sub) -> None:
    lm = sub.add_parser("lm", help="byte-level LM training on the stdlib corpus; routing traces")
    lm_sub = lm.add_subparsers(dest="lm", required=True)
    p = lm_sub.add_parser("train", help="train a preset's decoder (resumes)")
    add_fields(p, LMTrainConfig, positional=("preset",), skip=("corpus_limit",),
               help={"eval_every": "held-out loss every N steps (0: at the end only)"})
    p.set_defaults(fn=lm_train)
    p = lm_sub.add_parser("trace", help="record routing traces of a trained model")
    p.add_argument("model", help="moex checkpoint dir")
    p.add_argument("--domain", choices=["code", "prose"], required=True)
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=lm_trace)

    pr = sub.add_parser("predictor", help="routing-path predictor: train / eval / study")
    pr_sub = pr.add_subparsers(dest="predictor_cmd", required=True)
    p = pr_sub.add_parser("train", help="train on one trace file (90/10 request split)")
    p.add_argument("trace")
    p.add_argument("--out", required=True)
    add_fields(p, PredictorShape)
    add_fields(p, PredictorTrainConfig)
    p.set_defaults(fn=predictor_train)
    p = pr_sub.add_parser("eval", help="predictor and baselines on trace files")
    p.add_argument("predictor")
    p.add_argument("traces", nargs="+", help="trace files (e.g. in-domain and cross-domain)")
    p.add_argument("--prior-trace", required=True, help="trace for the frequency prior "
                   "(the predictor's training trace)")
    p.add_argument("--out")
    p.set_defaults(fn=predictor_eval)
    p = pr_sub.add_parser("study", help="the routing-path predictor study, end to end "
                          "(= experiments/routing_predictor.py)")
    add_fields(p, StudyConfig, help={
        "requests": "training-trace requests per domain",
        "vlm_family": "the VLM family of the VLM step",
        "vlm_questions": "training-trace questions of the VLM step",
        "vlm": "the VLM step (traces, predictor and offload bench of the trained mini-hard)"})
    p.set_defaults(fn=lambda args: study(from_args(StudyConfig, args)))


def lm_train(args) -> int:
    lm_run = from_args(LMTrainConfig, args)
    _, log = train_lm(lm_run)
    print(json.dumps(log[-1] if log else {}))
    print(f"model: {lm_run.run_dir / 'model'}")
    return 0


def lm_trace(args) -> int:
    cfg, params, _ = checkpoint.load(args.model)
    trace = record_traces(cfg, params, args.domain, args.split, args.requests, args.prompt_len,
                          args.new_tokens, args.batch, args.seed)
    print(f"wrote {trace.save(args.out)} ({len(trace)} tokens)")
    return 0


def predictor_train(args) -> int:
    log = train_from_trace(args.trace, args.out, from_args(PredictorShape, args),
                           from_args(PredictorTrainConfig, args))
    print(json.dumps(log[-1]))
    print(f"wrote {args.out}")
    return 0


def predictor_eval(args) -> int:
    report = evaluate_predictor(args.predictor, args.traces, args.prior_trace)
    text = markdown(report)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictor_eval.json").write_text(json.dumps(report, indent=1))
        (out / "predictor_eval.md").write_text(text + "\n")
        print(f"\nwrote {out}/predictor_eval.json, predictor_eval.md")
    return 0
