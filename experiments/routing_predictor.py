"""The routing-path predictor study, end to end (cached step by step under --runs):

  1. train small-hard's decoder as a byte-level LM on the stdlib corpus (code + prose)
  2. record routing traces of held-out and training prompts of both domains
  3. train one predictor per domain (on that domain's training trace)
  4. evaluate each predictor and every baseline in-domain and cross-domain
  5. `moex bench offload` on code prompts with lru, pregated, predictive:<code predictor> and
     predictive:oracle at 25 % and 12.5 % budgets
  6. the token scheduler on predicted routes of held-out requests: distinct experts per batch vs
     FIFO order, scheduling time, and decode tokens/s of the scheduled vs FIFO batches (lru 25 %)

    python experiments/routing_predictor.py
    python experiments/routing_predictor.py --lm-steps 100 --requests 32 --predictor-steps 300

Results: --out/{predictor_eval.md, predictor_eval.json, scheduler.json, report.md} and
--out/offload/ (the bench's files).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-hard")
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--requests", type=int, default=96, help="training-trace requests per domain")
    p.add_argument("--heldout-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--predictor-steps", type=int, default=1500)
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="results/routing_predictor")
    args = p.parse_args(argv)

    from moex import checkpoint
    from moex.cli import main as moex
    from moex.offload.trace import Trace
    from moex.predict.lm import LMTrainConfig, record_traces, train_lm

    runs, out = pathlib.Path(args.runs), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lc = LMTrainConfig(preset=args.preset, steps=args.lm_steps, out=str(runs / "lm"))
    if not (lc.run_dir / "model").exists():
        train_lm(lc)
    model_dir = lc.run_dir / "model"
    cfg, params, _ = checkpoint.load(model_dir)

    traces = {}
    for domain in ("code", "prose"):
        for split, n, seed in (("train", args.requests, 0), ("heldout", args.heldout_requests, 1)):
            path = runs / "traces" / f"{args.preset}-{domain}-{split}.npz"
            if not path.exists():
                record_traces(cfg, params, domain, split, n, args.prompt_len, args.new_tokens,
                              seed=seed).save(path)
            traces[domain, split] = path

    predictors = {}
    for domain in ("code", "prose"):
        path = runs / "rpp" / f"{args.preset}-{domain}"
        if not path.exists():
            moex(["predictor", "train", str(traces[domain, "train"]), "--out", str(path),
                  "--gen-len", str(args.new_tokens), "--steps", str(args.predictor_steps)])
        predictors[domain] = path

    evals = {}
    for domain in ("code", "prose"):
        other = "prose" if domain == "code" else "code"
        from moex.predict.evaluate import evaluate_predictor, markdown
        evals[domain] = evaluate_predictor(predictors[domain], [traces[domain, "heldout"],
                                                                traces[other, "heldout"]],
                                           traces[domain, "train"])
    (out / "predictor_eval.json").write_text(json.dumps(evals, indent=1))
    text = "\n\n".join(f"## Predictor trained on {d}\n\n" + markdown(r) for d, r in evals.items())
    (out / "predictor_eval.md").write_text(text + "\n")
    print(text)

    moex(["bench", "offload", "--checkpoint", str(model_dir), "--domain", "code",
          "--policies", "all-resident", "lru", "pregated", f"predictive:{predictors['code']}",
          "predictive:oracle", "--budgets", "100%", "25%", "12.5%", "--batch", "1", "4",
          "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
          "--repeats", str(args.bench_repeats), "--out", str(out / "offload")])

    sched = scheduler_study(cfg, params, predictors["code"], Trace.load(traces["code", "heldout"]),
                            args)
    (out / "scheduler.json").write_text(json.dumps(sched, indent=1))
    print(json.dumps(sched, indent=1))
    return 0


def scheduler_study(cfg, params, predictor, trace, args, batch: int = 4) -> dict:
    """Adjacent pairs of held-out request batches re-split by the scheduler on the predictor's
    routes (union over each request's prompt and generated positions): distinct experts per
    batch and decode tokens/s (lru, 25 %), scheduled vs FIFO."""
    from moex.offload.engine import OffloadEngine
    from moex.offload.store import ExpertStore
    from moex.predict.data import examples
    from moex.predict.scheduler import objective, schedule
    from moex.predict.train import load_predictor, predict
    rcfg, rparams = load_predictor(predictor)
    ex = examples(trace, rcfg.gen_len)
    probs = predict(rcfg, rparams, ex.tokens, ex.mask)
    from moex.predict.metrics import topk_sets
    pred = (topk_sets(probs, rcfg.top_k) & (ex.route_mask > 0)[..., None, None]).any(1)
    truth = (ex.routes & (ex.route_mask > 0)[..., None, None]).any(1)          # (R, L, E)
    store = ExpertStore.from_params(cfg, params)
    budget = store.total_bytes // 4
    rows, times = [], []
    rates = {"fifo": [], "scheduled": []}
    for s in range(0, len(ex) - 2 * batch + 1, 2 * batch):
        idx = np.arange(s, s + 2 * batch)
        t0 = time.perf_counter()
        a, b = schedule(pred[idx])
        times.append(time.perf_counter() - t0)
        fifo = (np.arange(batch), np.arange(batch, 2 * batch))
        rows.append({"fifo_true": objective(truth[idx], *fifo),
                     "scheduled_true": objective(truth[idx], a, b),
                     "fifo_pred": objective(pred[idx], *fifo),
                     "scheduled_pred": objective(pred[idx], a, b)})
        for label, (x, y) in (("fifo", fifo), ("scheduled", (a, b))):
            for half in (x, y):
                rows_idx = idx[half]
                eng = OffloadEngine(cfg, None, "lru", budget, store=store)
                eng.generate(ex.tokens[rows_idx], ex.mask[rows_idx],
                             max_new_tokens=args.new_tokens, stop_tokens=())
                t = eng.timings
                rates[label].append(len(rows_idx) * t["decode_steps"] / t["decode_s"])
    total = {k: int(sum(r[k] for r in rows)) for k in rows[0]} if rows else {}
    return {"batch": batch, "pairs": len(rows), "distinct_experts_sum": total,
            "schedule_ms_median": 1e3 * statistics.median(times) if times else None,
            "decode_tok_s_median": {k: statistics.median(v) for k, v in rates.items() if v},
            "layers": len(trace.moe_layers), "experts": trace.num_experts}


if __name__ == "__main__":
    sys.exit(main())
