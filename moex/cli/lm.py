"""`moex lm train | trace` and `moex predictor train | eval | study`: the small models' decoders as
byte-level LMs on the stdlib corpus, their routing traces, and the routing-path predictor.

    moex lm train small-hard --steps 400                  # -> runs/lm/small-hard/model
    moex lm train small-switch                            # encoder-decoder: a byte denoiser
    moex lm trace runs/lm/small-hard/model --domain code --split train --out traces/code.npz
    moex predictor train traces/code.npz --out runs/rpp/code
    moex lm trace runs/lm/small-hard/model --domain code --hidden --out traces/code.npz
    moex predictor train traces/code.npz --kind lookahead --out runs/heads/code
    moex predictor eval runs/rpp/code traces/code-heldout.npz traces/prose-heldout.npz \\
        --prior-trace traces/code.npz --heads runs/heads/code --out results/rpp
    moex predictor study                                  # = experiments/routing_predictor.py
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from moex import checkpoint
from moex.cli.args import add_fields, from_args
from moex.config import EncDecConfig, get_config
from moex.experiments.routing_predictor import StudyConfig, study
from moex.predict.evaluate import evaluate_predictors, markdown
from moex.predict.lm import LMTrainConfig, record_traces, train_lm
from moex.predict.lookahead import HeadShape, HeadTrainConfig, train_heads_from_trace
from moex.predict.seq2seq_lm import Seq2SeqTrainConfig, examples, train_seq2seq
from moex.predict.train import PredictorShape, PredictorTrainConfig, train_from_trace


def register(sub) -> None:
    lm = sub.add_parser("lm", help="byte-level LM training on the stdlib corpus; routing traces")
    lm_sub = lm.add_subparsers(dest="lm", required=True)
    _train_parser(lm_sub)
    p = lm_sub.add_parser("trace", help="record routing traces of a trained model")
    p.add_argument("model", help="moex checkpoint dir")
    p.add_argument("--domain", choices=["code", "prose"], required=True)
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", action="store_true", help="also record every MoE layer's hidden "
                   "states (trace format v3; what `moex predictor train --kind lookahead` needs)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=lm_trace)

    pr = sub.add_parser("predictor", help="routing-path predictor: train / eval / study")
    pr_sub = pr.add_subparsers(dest="predictor_cmd", required=True)
    p = pr_sub.add_parser("train", help="train a routing-path predictor or lookahead heads on "
                          "one trace file (90/10 request split)")
    p.add_argument("trace")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=["rpp", "lookahead"], default="rpp",
                   help="rpp: the routing-path predictor (prompt -> routes); lookahead: per-layer "
                   "heads (hidden state -> the next layers' experts; the trace needs --hidden)")
    add_fields(p, PredictorShape, help={"gen_len": "rpp: generated positions forecast"})
    add_fields(p, PredictorTrainConfig, defaults={"batch_size": None}, help={
        "batch_size": "requests (rpp; default 16) or trace rows (lookahead; default 256) per step",
        "head_lr": "rpp", "body_lr": "rpp"})
    add_fields(p, HeadShape, help={"offsets": "lookahead: head l predicts MoE layers l + o",
                                   "hidden": "lookahead: hidden width (0: linear heads)",
                                   "source": "lookahead: post-attention or pre-attention"})
    add_fields(p, HeadTrainConfig, skip=("steps", "batch_size", "warmup", "weight_decay",
                                         "seed"), help={"lr": "lookahead"})
    p.set_defaults(fn=predictor_train)
    p = pr_sub.add_parser("eval", help="predictors and baselines on trace files")
    p.add_argument("predictor", nargs="?", help="routing-path predictor folder (optional)")
    p.add_argument("traces", nargs="+", help="trace files (e.g. in-domain and cross-domain)")
    p.add_argument("--prior-trace", required=True, help="trace for the frequency prior "
                   "(the predictor's training trace)")
    p.add_argument("--heads", action="append", default=[],
                   help="a lookahead head-set folder (repeat for several)")
    p.add_argument("--gen-len", type=int, default=16,
                   help="generated positions per request (without a predictor; else its own)")
    p.add_argument("--out")
    p.set_defaults(fn=predictor_eval)
    p = pr_sub.add_parser("study", help="the routing-path predictor study, end to end "
                          "(= experiments/routing_predictor.py)")
    add_fields(p, StudyConfig, help={
        "requests": "training-trace requests per domain",
        "vlm_family": "the VLM family of the VLM step",
        "vlm_questions": "training-trace questions of the VLM step",
        "vlm": "the VLM step (traces, predictors and offload bench of the trained mini-hard)",
        "head_steps": "training steps of each lookahead head set",
        "head_hidden": "lookahead heads' hidden width (0: linear heads)"})
    p.set_defaults(fn=lambda args: study(from_args(StudyConfig, args)))


def _train_parser(lm_sub) -> None:
    """`moex lm train`: LMTrainConfig's options and Seq2SeqTrainConfig's own. The options both
    share whose defaults differ default to None here: the preset's kind picks the dataclass,
    whose default fills them (lm_train)."""
    p = lm_sub.add_parser("train", help="train a preset's decoder as a byte LM, or an "
                          "encoder-decoder preset as a byte denoiser (span corruption); resumes")
    shared = {f.name: f.default for f in dataclasses.fields(Seq2SeqTrainConfig)}
    differ = {f.name: (f.default, shared[f.name]) for f in dataclasses.fields(LMTrainConfig)
              if f.name in shared and f.name != "preset" and f.default != shared[f.name]}
    add_fields(p, LMTrainConfig, positional=("preset",), skip=("corpus_limit",),
               defaults=dict.fromkeys(differ),
               help={"eval_every": "held-out loss every N steps (0: at the end only)",
                     "mesh": "devices to train on, e.g. data=2,expert=4 (axes data, fsdp, "
                             "tensor, expert; README: Choosing a mesh); default one device "
                             "(decoder LMs only)",
                     **{k: ("window bytes (encoder-decoders: before corruption) "
                            if k == "seq_len" else "")
                        + f"(default: {lm} for decoder LMs, {s2s} for encoder-decoders)"
                        for k, (lm, s2s) in differ.items()}})
    both = tuple(k for k in shared if k in LMTrainConfig.__dataclass_fields__)
    add_fields(p, Seq2SeqTrainConfig, skip=both + ("corpus_limit",),
               help={"noise_density": "encoder-decoders: fraction of each window's bytes masked",
                     "mean_span": "encoder-decoders: mean masked-span length in bytes"})
    p.set_defaults(fn=lm_train)


def _run_config(cls, args):
    """`cls` from the arguments, its own defaults for the options left unset (None)."""
    unset = {f.name: f.default for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is None and f.default is not dataclasses.MISSING}
    return from_args(cls, args, **unset)


def lm_train(args) -> int:
    if isinstance(get_config(args.preset), EncDecConfig):
        return seq2seq_train(args)
    lm_run = _run_config(LMTrainConfig, args)
    _, log = train_lm(lm_run)
    print(json.dumps(log[-1] if log else {}))
    print(f"model: {lm_run.run_dir / 'model'}")
    return 0


def seq2seq_train(args) -> int:
    if args.mesh:
        raise SystemExit(f"--mesh: {args.preset} is an encoder-decoder, whose denoising "
                         f"training runs on one device; drop --mesh")
    run = _run_config(Seq2SeqTrainConfig, args)
    params, log = train_seq2seq(run)
    print("initial: " + json.dumps({k: v for k, v in log[0].items()
                                    if k.startswith(("heldout", "span_acc"))}))
    print(json.dumps(log[-1]))
    cfg = get_config(run.preset)
    for domain, got in examples(cfg, params, run, n=1).items():
        print(f"{domain}: greedy exact-span accuracy {got['span_acc']:.3f}")
        for row in got["rows"]:
            for k in ("input", "target", "greedy"):
                print(f"  {k:>6}: {row[k]!r}")
    print(f"model: {run.run_dir / 'model'}")
    return 0


def lm_trace(args) -> int:
    cfg, params, _ = checkpoint.load(args.model)
    trace = record_traces(cfg, params, args.domain, args.split, args.requests, args.prompt_len,
                          args.new_tokens, args.batch, args.seed, hidden=args.hidden)
    print(f"wrote {trace.save(args.out)} ({len(trace)} tokens)")
    return 0


def predictor_train(args) -> int:
    train_cfg = from_args(PredictorTrainConfig, args)
    if args.kind == "lookahead":
        head_cfg = from_args(HeadTrainConfig, args, steps=train_cfg.steps,
                             batch_size=train_cfg.batch_size or HeadTrainConfig.batch_size,
                             warmup=train_cfg.warmup, weight_decay=train_cfg.weight_decay,
                             seed=train_cfg.seed)
        log = train_heads_from_trace(args.trace, args.out, from_args(HeadShape, args), head_cfg)
    else:
        train_cfg = dataclasses.replace(
            train_cfg, batch_size=train_cfg.batch_size or PredictorTrainConfig.batch_size)
        log = train_from_trace(args.trace, args.out, from_args(PredictorShape, args), train_cfg)
    print(json.dumps(log[-1]))
    print(f"wrote {args.out}")
    return 0


def predictor_eval(args) -> int:
    traces = list(args.traces)
    predictor = args.predictor
    if predictor and predictor.endswith(".npz"):       # no predictor: the first trace file
        predictor, traces = None, [predictor] + traces
    report = evaluate_predictors(traces, args.prior_trace, predictor, args.heads, args.gen_len)
    text = markdown(report)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictor_eval.json").write_text(json.dumps(report, indent=1))
        (out / "predictor_eval.md").write_text(text + "\n")
        print(f"\nwrote {out}/predictor_eval.json, predictor_eval.md")
    return 0
