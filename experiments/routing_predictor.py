"""The routing-path predictor study, end to end (cached step by step under --runs):

  1. train small-hard's decoder as a byte-level LM on the stdlib corpus (code + prose)
  2. record routing traces of held-out and training prompts of both domains
  3. train one predictor per domain (on that domain's training trace)
  4. evaluate each predictor and every baseline in-domain and cross-domain
  5. `moex bench offload` on code prompts with lru, pregated, predictive:<code predictor> and
     predictive:oracle at 25 % and 12.5 % budgets
  6. the token scheduler at every decode step of held-out requests (on the predictor's routes):
     distinct experts per batch vs FIFO order, scheduling time, and the decode tokens/s of both
     orders replayed through the simulator (lru, 25 %)
  7. the third domain, VLM prompts: the trained mini-hard VLM of the main job (trained by its
     recipe if missing; --no-vlm skips it) answers synthetic MMBench questions; traces of the
     train and dev splits, a predictor trained on the first and evaluated on the second (per
     question category too), and `moex bench offload --domain vlm`

    python experiments/routing_predictor.py
    python experiments/routing_predictor.py --lm-steps 100 --requests 32 --predictor-steps 300

Results: --out/{predictor_eval.md, predictor_eval.json, scheduler.json, vlm_eval.md,
vlm_eval.json} and --out/offload/, --out/offload_vlm/ (the bench's files).
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
    p.add_argument("--vlm-family", default="mini", help="the VLM family of step 7")
    p.add_argument("--vlm-questions", type=int, default=512, help="training-trace questions")
    p.add_argument("--no-vlm", action="store_true", help="skip step 7")
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="results/routing_predictor")
    args = p.parse_args(argv)

    from moex import checkpoint
    from moex.cli import main as moex
    from moex.offload.trace import Trace
    from moex.predict.lm import LMTrainConfig, record_traces, train_lm
    from moex.training import trained_model_dir

    runs, out = pathlib.Path(args.runs), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lc = LMTrainConfig(preset=args.preset, steps=args.lm_steps, out=str(runs / "lm"))
    model_dir = trained_model_dir(lc.run_dir, lc, lambda: train_lm(lc))
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
    if not args.no_vlm:
        vlm_domain(args, runs, out, moex)
    return 0


def vlm_domain(args, runs: pathlib.Path, out: pathlib.Path, moex) -> None:
    """Step 7: traces, predictor and offload bench on the trained hard-MoE VLM's prompts."""
    from moex.predict.evaluate import evaluate_predictor, markdown
    from moex.train_vlm import Recipe, train_family
    recipe = Recipe(data=str(runs / "data" / "synthetic"), out=str(runs / "vlm"))
    _, _, model_dir = train_family(args.vlm_family, recipe)[1]
    traces = {}
    for split, n in (("train", args.vlm_questions), ("dev", 128)):
        path = runs / "traces" / f"{args.vlm_family}-hard-vlm-{split}.npz"
        if not path.exists():
            moex(["vlm", "trace", str(model_dir), "--split", split, "--questions", str(n),
                  "--data", recipe.data, "--out", str(path)])
        traces[split] = path
    predictor = runs / "rpp" / f"{args.vlm_family}-hard-vlm"
    if not predictor.exists():
        moex(["predictor", "train", str(traces["train"]), "--out", str(predictor),
              "--gen-len", "4", "--steps", str(args.predictor_steps)])
    result = evaluate_predictor(predictor, [traces["dev"]], traces["train"])
    (out / "vlm_eval.json").write_text(json.dumps(result, indent=1))
    text = "## Predictor trained on VLM prompts (train split), evaluated on the dev split\n\n"
    (out / "vlm_eval.md").write_text(text + markdown(result) + "\n")
    print(text + markdown(result))
    moex(["bench", "offload", "--checkpoint", str(model_dir), "--domain", "vlm",
          "--data", recipe.data, "--policies", "all-resident", "lru", "pregated",
          f"predictive:{predictor}", "predictive:oracle", "--budgets", "100%", "25%", "12.5%",
          "--batch", "1", "4", "--new-tokens", "4", "--repeats", str(args.bench_repeats),
          "--out", str(out / "offload_vlm")])


def scheduler_study(cfg, params, predictor, trace, args, batch: int = 4) -> dict:
    """Token-level scheduling at every decode step: the next tokens of 2 x `batch` adjacent
    held-out requests are re-split by the scheduler on the predictor's routes for that position.
    Reported: distinct experts summed over steps, layers and both batches (true routes), FIFO vs
    scheduled (and, as the scheduler's ceiling, scheduled on the true routes themselves); scheduling time; and decode tokens/s of both orders replayed through the
    simulator under lru and pregated at 25 % (copy time calibrated on this machine, compute time
    per layer visit from the engine's all-resident decode)."""
    from moex.offload.cache import Visit
    from moex.offload.engine import OffloadEngine
    from moex.offload.simulator import ComputeModel, TransferModel, simulate_stream
    from moex.offload.store import ExpertStore
    from moex.predict.data import examples
    from moex.predict.metrics import topk_sets
    from moex.predict.scheduler import objective, schedule
    from moex.predict.train import load_predictor, predict
    rcfg, rparams = load_predictor(predictor)
    ex = examples(trace, rcfg.gen_len)
    p = ex.tokens.shape[1]
    pred = topk_sets(predict(rcfg, rparams, ex.tokens, ex.mask), rcfg.top_k)   # (R, P+G, L, E)
    store = ExpertStore.from_params(cfg, params)
    for _ in range(2):                                   # the first run compiles
        ref = OffloadEngine(cfg, None, "all-resident", store.total_bytes, store=store)
        ref.generate(ex.tokens[:batch], ex.mask[:batch], max_new_tokens=args.new_tokens,
                     stop_tokens=())
    t = ref.timings
    compute = ComputeModel(t["decode_s"] / max(t["decode_steps"] * len(store.layers), 1))
    transfer = TransferModel(bandwidth_bytes_per_s=store.expert_bytes / ref.calibrate_copy(),
                             latency_s=0.0)
    totals = {"fifo": 0, "scheduled": 0, "scheduled_on_true_routes": 0}
    streams = {"fifo": [], "scheduled": []}
    times = []
    for s in range(0, len(ex) - 2 * batch + 1, 2 * batch):
        idx = np.arange(s, s + 2 * batch)
        for g in range(rcfg.gen_len):
            if not (ex.route_mask[idx, p + g] > 0).all():
                continue
            truth = ex.routes[idx, p + g]                                   # (2T, L, E)
            t0 = time.perf_counter()
            a, b = schedule(pred[idx, p + g])
            times.append(time.perf_counter() - t0)
            fifo = (np.arange(batch), np.arange(batch, 2 * batch))
            totals["scheduled_on_true_routes"] += objective(truth, *schedule(truth))
            for label, halves in (("fifo", fifo), ("scheduled", (a, b))):
                totals[label] += objective(truth, *halves)
                for half in halves:
                    used = truth[half].any(0)                               # (L, E)
                    streams[label] += [Visit(layer, frozenset(np.flatnonzero(used[li]).tolist()),
                                             tokens=batch)
                                       for li, layer in enumerate(store.layers)]
    sims = {}
    slots = store.total_bytes // 4 // store.expert_bytes
    for policy in ("lru",):
        for label, stream in streams.items():
            r = simulate_stream(stream, policy, slots, store.layers, store.num_experts,
                                store.expert_bytes, transfer, compute)
            sims[f"{policy}_{label}"] = {"tokens_per_s": r.tokens_per_s, "loads": r.stats.loads,
                                         "hit_rate": r.hit_rate}
    return {"batch": batch, "steps_scheduled": len(times),
            "distinct_experts_sum": totals,
            "reduction": 1 - totals["scheduled"] / max(totals["fifo"], 1),
            "schedule_ms_median": 1e3 * statistics.median(times) if times else None,
            "simulated_decode_25pct": sims, "compute_s_per_visit": compute.seconds_per_layer,
            "copy_s_per_expert": store.expert_bytes / transfer.bandwidth_bytes_per_s,
            "layers": len(trace.moe_layers), "experts": trace.num_experts}


if __name__ == "__main__":
    sys.exit(main())
