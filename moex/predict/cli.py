"""`moex lm ...` and `moex predictor ...`: train the small models' decoders on the stdlib corpus,
record routing traces, train and evaluate the routing-path predictor.

    moex lm train small-hard --steps 400                  # -> runs/lm/small-hard/model
    moex lm trace runs/lm/small-hard/model --domain code --split train --out traces/code.npz
    moex predictor train traces/code.npz --out runs/rpp/code
    moex predictor eval runs/rpp/code traces/code-heldout.npz traces/prose-heldout.npz \\
        --prior-trace traces/code.npz --out results/rpp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib


def _lm_train(args) -> int:
    from moex.predict.lm import LMTrainConfig, train_lm
    lc = LMTrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, seed=args.seed, out=args.out,
                       eval_every=args.eval_every)
    _, log = train_lm(lc)
    print(json.dumps(log[-1] if log else {}))
    print(f"model: {lc.run_dir / 'model'}")
    return 0


def _lm_trace(args) -> int:
    from moex import checkpoint
    from moex.predict.lm import record_traces
    cfg, params, _ = checkpoint.load(args.model)
    trace = record_traces(cfg, params, args.domain, args.split, args.requests, args.prompt_len,
                          args.new_tokens, args.batch, args.seed)
    print(f"wrote {trace.save(args.out)} ({len(trace)} tokens)")
    return 0


def _predictor_train(args) -> int:
    from moex.offload.trace import Trace
    from moex.predict.data import examples
    from moex.predict.model import RPPConfig
    from moex.predict.train import PredictorTrainConfig, save_predictor, train_predictor
    trace = Trace.load(args.trace)
    ex = examples(trace, args.gen_len)
    train, val = ex.split(0.1, args.seed)
    rcfg = RPPConfig(len(trace.moe_layers), trace.num_experts, trace.top_k,
                     vocab_size=int(max(trace.token.max() + 1, args.vocab_size)),
                     d_model=args.d_model, d_ff=args.d_ff, gen_len=args.gen_len,
                     max_prompt=max(args.max_prompt, ex.tokens.shape[1]), model=trace.model)
    tc = PredictorTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    out = pathlib.Path(args.out)
    params, log = train_predictor(train, rcfg, tc, ckpt_dir=out.with_name(out.name + ".train"),
                                  evaluate=_val_loss(rcfg, val))
    save_predictor(out, rcfg, params, {"trace": str(args.trace), "train": dataclasses.asdict(tc),
                                       "log": log})
    print(json.dumps(log[-1]))
    print(f"wrote {out}")
    return 0


def _val_loss(rcfg, val):
    import jax.numpy as jnp
    from moex.predict.train import loss_fn
    loss = loss_fn(rcfg)

    def evaluate(state) -> dict:
        batch = {"tokens": jnp.asarray(val.tokens), "mask": jnp.asarray(val.mask),
                 "routes": jnp.asarray(val.routes), "route_mask": jnp.asarray(val.route_mask)}
        return {"val_loss": float(loss(state.params, batch)[0])}
    return evaluate


def _predictor_eval(args) -> int:
    from moex.predict.evaluate import evaluate_predictor, markdown
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


def add_commands(sub) -> None:
    lm = sub.add_parser("lm", help="byte-level LM training on the stdlib corpus; routing traces")
    lm_sub = lm.add_subparsers(dest="lm", required=True)
    p = lm_sub.add_parser("train", help="train a preset's decoder (resumes)")
    p.add_argument("preset")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lm")
    p.set_defaults(fn=_lm_train)
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
    p.set_defaults(fn=_lm_trace)

    pr = sub.add_parser("predictor", help="routing-path predictor: train / eval")
    pr_sub = pr.add_subparsers(dest="predictor_cmd", required=True)
    p = pr_sub.add_parser("train", help="train on one trace file (90/10 request split)")
    p.add_argument("trace")
    p.add_argument("--out", required=True)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=260)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_predictor_train)
    p = pr_sub.add_parser("eval", help="predictor and baselines on trace files")
    p.add_argument("predictor")
    p.add_argument("traces", nargs="+", help="trace files (e.g. in-domain and cross-domain)")
    p.add_argument("--prior-trace", required=True, help="trace for the frequency prior "
                   "(the predictor's training trace)")
    p.add_argument("--out")
    p.set_defaults(fn=_predictor_eval)
