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

    python experiments/routing_predictor.py            # = moex predictor study
    python experiments/routing_predictor.py --lm-steps 100 --requests 32 --predictor-steps 300

Results: --out/{predictor_eval.md, predictor_eval.json, scheduler.json, vlm_eval.md,
vlm_eval.json} and --out/offload/, --out/offload_vlm/ (the bench's files).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time

import numpy as np

from moex import checkpoint
from moex.experiments import offload_grid
from moex.offload.cache import Visit
from moex.offload.forecast import reference_run
from moex.offload.simulator import ComputeModel, TransferModel, simulate_stream
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace
from moex.predict.data import examples
from moex.predict.evaluate import evaluate_predictor, markdown
from moex.predict.lm import LMTrainConfig, record_traces, train_lm
from moex.predict.metrics import topk_sets
from moex.predict.scheduler import objective, schedule
from moex.predict.train import (PredictorShape, PredictorTrainConfig, load_predictor, predict,
                                train_from_trace)
from moex.predict.vlm import trace_benchmark
from moex.train_vlm import Recipe, train_family
from moex.training import trained_model_dir


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    preset: str = "small-hard"
    lm_steps: int = 400
    requests: int = 96                  # training-trace requests per domain
    heldout_requests: int = 32
    prompt_len: int = 64
    new_tokens: int = 16
    predictor_steps: int = 1500
    bench_repeats: int = 3
    vlm_family: str = "mini"            # the VLM family of step 7
    vlm_questions: int = 512            # training-trace questions of step 7
    vlm: bool = True                    # run step 7
    runs: str = "runs"
    out: str = "results/routing_predictor"


def study(plan: StudyConfig) -> int:
    runs, out = pathlib.Path(plan.runs), pathlib.Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    lm_run = LMTrainConfig(preset=plan.preset, steps=plan.lm_steps, out=str(runs / "lm"))
    model_dir = trained_model_dir(lm_run.run_dir, lm_run, lambda: train_lm(lm_run))
    cfg, params, _ = checkpoint.load(model_dir)

    traces = {}
    for domain in ("code", "prose"):
        for split, n, seed in (("train", plan.requests, 0), ("heldout", plan.heldout_requests, 1)):
            path = runs / "traces" / f"{plan.preset}-{domain}-{split}.npz"
            if not path.exists():
                record_traces(cfg, params, domain, split, n, plan.prompt_len, plan.new_tokens,
                              seed=seed).save(path)
            traces[domain, split] = path

    predictors = {domain: predictor(traces[domain, "train"],
                                    runs / "rpp" / f"{plan.preset}-{domain}", plan.new_tokens,
                                    plan.predictor_steps)
                  for domain in ("code", "prose")}
    evals = {}
    for domain in ("code", "prose"):
        other = "prose" if domain == "code" else "code"
        evals[domain] = evaluate_predictor(predictors[domain], [traces[domain, "heldout"],
                                                                traces[other, "heldout"]],
                                           traces[domain, "train"])
    (out / "predictor_eval.json").write_text(json.dumps(evals, indent=1))
    text = "\n\n".join(f"## Predictor trained on {d}\n\n" + markdown(r) for d, r in evals.items())
    (out / "predictor_eval.md").write_text(text + "\n")
    print(text)

    offload_grid.bench(offload_grid.OffloadBenchConfig(
        checkpoint=str(model_dir), domain="code",
        policies=("all-resident", "lru", "pregated", f"predictive:{predictors['code']}",
                  "predictive:oracle"), budgets=("100%", "25%", "12.5%"), batch_sizes=(1, 4),
        prompt_len=plan.prompt_len, new_tokens=plan.new_tokens, repeats=plan.bench_repeats,
        out=str(out / "offload")))

    sched = scheduler_study(cfg, params, predictors["code"], Trace.load(traces["code", "heldout"]),
                            plan.new_tokens)
    (out / "scheduler.json").write_text(json.dumps(sched, indent=1))
    print(json.dumps(sched, indent=1))
    if plan.vlm:
        vlm_domain(plan, runs, out)
    return 0


def predictor(trace: pathlib.Path, path: pathlib.Path, gen_len: int, steps: int) -> pathlib.Path:
    """The predictor trained on `trace` (trained now unless `path` holds it)."""
    if not path.exists():
        train_from_trace(trace, path, PredictorShape(gen_len=gen_len),
                         PredictorTrainConfig(steps=steps))
    return path


def vlm_domain(plan: StudyConfig, runs: pathlib.Path, out: pathlib.Path) -> None:
    """Step 7: traces, predictor and offload bench on the trained hard-MoE VLM's prompts."""
    recipe = Recipe(data=str(runs / "data" / "synthetic"), out=str(runs / "vlm"))
    _, _, model_dir = train_family(plan.vlm_family, recipe)[1]
    traces = {}
    for split, n in (("train", plan.vlm_questions), ("dev", 128)):
        path = runs / "traces" / f"{plan.vlm_family}-hard-vlm-{split}.npz"
        if not path.exists():
            trace_benchmark(model_dir, split=split, questions=n, data=recipe.data)[0].save(path)
        traces[split] = path
    rpp = predictor(traces["train"], runs / "rpp" / f"{plan.vlm_family}-hard-vlm", 4,
                    plan.predictor_steps)
    result = evaluate_predictor(rpp, [traces["dev"]], traces["train"])
    (out / "vlm_eval.json").write_text(json.dumps(result, indent=1))
    text = "## Predictor trained on VLM prompts (train split), evaluated on the dev split\n\n"
    (out / "vlm_eval.md").write_text(text + markdown(result) + "\n")
    print(text + markdown(result))
    offload_grid.bench(offload_grid.OffloadBenchConfig(
        checkpoint=str(model_dir), domain="vlm", data=recipe.data,
        policies=("all-resident", "lru", "pregated", f"predictive:{rpp}", "predictive:oracle"),
        budgets=("100%", "25%", "12.5%"), batch_sizes=(1, 4), new_tokens=4,
        repeats=plan.bench_repeats, out=str(out / "offload_vlm")))


def scheduler_study(cfg, params, predictor, trace, new_tokens: int, batch: int = 4) -> dict:
    """Token-level scheduling at every decode step: the next tokens of 2 x `batch` adjacent
    held-out requests are re-split by the scheduler on the predictor's routes for that position.
    Reported: distinct experts summed over steps, layers and both batches (true routes), FIFO vs
    scheduled (and, as the scheduler's ceiling, scheduled on the true routes themselves); scheduling time; and decode tokens/s of both orders replayed through the
    simulator under lru and pregated at 25 % (copy time calibrated on this machine, compute time
    per layer visit from the engine's all-resident decode)."""
    rpp_cfg, rparams = load_predictor(predictor)
    ex = examples(trace, rpp_cfg.gen_len)
    p = ex.tokens.shape[1]
    pred = topk_sets(predict(rpp_cfg, rparams, ex.tokens, ex.mask), rpp_cfg.top_k)   # (R, P+G, L, E)
    store = ExpertStore.from_params(cfg, params)
    for _ in range(2):                                   # the first run compiles
        ref = reference_run(cfg, store, ex.tokens[:batch], ex.mask[:batch],
                            new_tokens=new_tokens)
    t = ref.timings
    compute = ComputeModel(t["decode_s"] / max(t["decode_steps"] * len(store.layers), 1))
    transfer = TransferModel(bandwidth_bytes_per_s=store.expert_bytes / ref.calibrate_copy(),
                             latency_s=0.0)
    totals = {"fifo": 0, "scheduled": 0, "scheduled_on_true_routes": 0}
    streams = {"fifo": [], "scheduled": []}
    times = []
    for s in range(0, len(ex) - 2 * batch + 1, 2 * batch):
        idx = np.arange(s, s + 2 * batch)
        for g in range(rpp_cfg.gen_len):
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
