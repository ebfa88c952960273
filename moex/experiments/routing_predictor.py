"""The expert-prediction study, end to end (cached step by step under --runs):

  1. train small-hard's decoder as a byte-level LM on the stdlib corpus (code + prose)
  2. record routing traces (with hidden states) of held-out and training prompts of both domains
  3. train per domain: a routing-path predictor (RPP) and lookahead heads (d = 1, 2, 3, on the
     post-attention hidden state); on code also the pre-attention heads (d = 0 .. 3)
  4. evaluate every predictor and baseline in-domain and cross-domain (all positions, generated
     positions only), and what each costs per token against one layer's compute
  5. `moex bench offload` on code prompts: lru, pregated, predictive:rpp, lookahead,
     predictive:rpp+lookahead (the combined policy) and predictive:oracle at 25 % and 12.5 %
     budgets, B = 1 and 4, with Belady's hit rate per point
  6. the token scheduler at every decode step of held-out requests on each prediction (RPP,
     TLP, the combined routes, the true routes): distinct experts per batch vs FIFO order,
     scheduling time, and the decode tokens/s of the orders replayed through the simulator
  7. the third domain, VLM prompts: the trained mini-hard VLM of the main job (trained by its
     recipe if missing; --no-vlm skips it) answers synthetic MMBench questions; traces of the
     train and dev splits, RPPs of two sizes (the wider also with the first MoE layer's input
     states, which carry the image tokens) and lookahead heads trained on the first and
     evaluated on the second (per question category and on generated positions too), and
     `moex bench offload --domain vlm` with the image-state RPP

    python experiments/routing_predictor.py            # = moex predictor study
    python experiments/routing_predictor.py --lm-steps 100 --requests 32 --predictor-steps 300

Results: --out/{predictor_eval.md, predictor_eval.json, costs.json, scheduler.json,
vlm_eval.md, vlm_eval.json} and --out/offload/, --out/offload_vlm/ (the bench's files).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from moex import checkpoint
from moex.experiments import offload_grid
from moex.offload.cache import Visit
from moex.offload.forecast import reference_run
from moex.offload.simulator import ComputeModel, TransferModel, simulate_stream
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace
from moex.predict.data import examples, on_grid
from moex.predict.evaluate import evaluate_predictors, markdown
from moex.predict.lm import LMTrainConfig, record_traces, train_lm
from moex.predict.lookahead import (HeadShape, HeadTrainConfig, LookaheadHints, head_probabilities,
                                    layer_scores, load_heads, train_heads_from_trace)
from moex.predict.metrics import baselines, frequency_prior, topk_sets
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
    requests: int = 288                 # training-trace requests per domain
    heldout_requests: int = 32
    prompt_len: int = 64
    new_tokens: int = 16
    predictor_steps: int = 1500
    head_steps: int = 3000
    head_hidden: int = 512              # lookahead heads' hidden width (0: linear)
    bench_repeats: int = 3
    vlm_family: str = "mini"            # the VLM family of step 7
    vlm_questions: int = 512            # training-trace questions of step 7
    vlm: bool = True                    # run step 7
    runs: str = "runs"
    out: str = "results/routing_predictor"


def traced(path: pathlib.Path, requests: int, record) -> pathlib.Path:
    """`path`, recorded now unless it holds a trace of `requests` requests with hidden states."""
    if path.exists():
        old = Trace.load(path)
        if old.hidden is not None and len(np.unique(old.request)) == requests:
            return path
    record().save(path)
    return path


def study(plan: StudyConfig) -> int:
    runs, out = pathlib.Path(plan.runs), pathlib.Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    lm_run = LMTrainConfig(preset=plan.preset, steps=plan.lm_steps, out=str(runs / "lm"))
    model_dir = trained_model_dir(lm_run.run_dir, lm_run, lambda: train_lm(lm_run))
    cfg, params, _ = checkpoint.load(model_dir)

    traces = {}
    for domain in ("code", "prose"):
        for split, n, seed in (("train", plan.requests, 0), ("heldout", plan.heldout_requests, 1)):
            traces[domain, split] = traced(
                runs / "traces" / f"{plan.preset}-{domain}-{split}.npz", n,
                lambda: record_traces(cfg, params, domain, split, n, plan.prompt_len,
                                      plan.new_tokens, seed=seed, hidden=True))

    predictors, heads = {}, {}
    for domain in ("code", "prose"):
        predictors[domain] = predictor(traces[domain, "train"],
                                       runs / "rpp" / f"{plan.preset}-{domain}", plan.new_tokens,
                                       plan.predictor_steps)
        heads[domain] = head_set(traces[domain, "train"],
                                 runs / "heads" / f"{plan.preset}-{domain}", plan,
                                 HeadShape(hidden=plan.head_hidden))
    pre_attention = head_set(traces["code", "train"], runs / "heads" / f"{plan.preset}-code-pre",
                             plan, HeadShape((0, 1, 2, 3), plan.head_hidden, "pre-attention"))
    evals = {}
    for domain in ("code", "prose"):
        other = "prose" if domain == "code" else "code"
        extra = [pre_attention] if domain == "code" else []
        evals[domain] = evaluate_predictors(
            [traces[domain, "heldout"], traces[other, "heldout"]], traces[domain, "train"],
            predictors[domain], [heads[domain]] + extra)
    (out / "predictor_eval.json").write_text(json.dumps(evals, indent=1))
    text = "\n\n".join(f"## Predictors trained on {d}\n\n" + markdown(r) for d, r in evals.items())
    (out / "predictor_eval.md").write_text(text + "\n")
    print(text)

    store = ExpertStore.from_params(cfg, params)
    costs = predictor_costs(cfg, store, predictors["code"], heads["code"],
                            Trace.load(traces["code", "heldout"]), plan.prompt_len)
    (out / "costs.json").write_text(json.dumps(costs, indent=1))
    print(json.dumps(costs, indent=1))

    offload_grid.bench(offload_grid.OffloadBenchConfig(
        checkpoint=str(model_dir), domain="code", policies=bench_policies(predictors["code"],
                                                                          heads["code"]),
        budgets=("100%", "25%", "12.5%"), batch_sizes=(1, 4),
        prompt_len=plan.prompt_len, new_tokens=plan.new_tokens, repeats=plan.bench_repeats,
        out=str(out / "offload")))

    sched = scheduler_study(cfg, params, predictors["code"], heads["code"],
                            Trace.load(traces["code", "heldout"]), plan.new_tokens)
    (out / "scheduler.json").write_text(json.dumps(sched, indent=1))
    print(json.dumps(sched, indent=1))
    if plan.vlm:
        vlm_domain(plan, runs, out)
    return 0


def bench_policies(rpp, heads) -> tuple:
    return ("all-resident", "lru", "pregated", f"predictive:{rpp}", f"lookahead:{heads}",
            f"predictive:{rpp}+{heads}", "predictive:oracle")


def predictor(trace: pathlib.Path, path: pathlib.Path, gen_len: int, steps: int,
              shape: PredictorShape | None = None) -> pathlib.Path:
    """The predictor trained on `trace` (trained now unless `path` holds it)."""
    if not path.exists():
        train_from_trace(trace, path, shape or PredictorShape(gen_len=gen_len),
                         PredictorTrainConfig(steps=steps))
    return path


def head_set(trace: pathlib.Path, path: pathlib.Path, plan: StudyConfig,
             shape: HeadShape) -> pathlib.Path:
    """Lookahead heads trained on `trace` (trained now unless `path` holds them)."""
    if not path.exists():
        train_heads_from_trace(trace, path, shape, HeadTrainConfig(steps=plan.head_steps))
    return path


def _median_s(fn, repeats: int = 20) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def predictor_costs(cfg, store, rpp, heads, trace, prompt_len: int) -> dict:
    """What each predictor costs: the heads of one layer on one decode token and the RPP on one
    request (its prompt, at admission) -- medians of jitted calls -- against one MoE layer's
    compute in the all-resident B = 1 decode; and the heads' size against the expert bytes."""
    rpp_cfg, rparams = load_predictor(rpp)
    hints = LookaheadHints.load(heads)
    ex = examples(trace, rpp_cfg.gen_len)
    for _ in range(2):                                   # the first run compiles
        ref = reference_run(cfg, store, ex.tokens[:1], ex.mask[:1], new_tokens=16)
    t = ref.timings
    layer_s = t["decode_s"] / max(1, t["decode_steps"] * cfg.decoder.num_layers)
    x = jax.device_put(np.asarray(trace.hidden[:1, 0][None], np.float32))        # (1, 1, D)
    head_s = _median_s(lambda: hints.dispatch(0, x))
    rpp_s = _median_s(lambda: predict(rpp_cfg, rparams, ex.tokens[:1], ex.mask[:1]))
    head_bytes = hints.cfg.head_params * 4
    return {"layer_compute_s_b1_decode": layer_s,
            "lookahead_head_s_per_token_layer": head_s, "head_vs_layer": head_s / layer_s,
            "rpp_s_per_request": rpp_s, "rpp_positions_per_request": int(ex.routes.shape[1]),
            "rpp_s_per_position": rpp_s / ex.routes.shape[1],
            "rpp_vs_layer_per_position": rpp_s / ex.routes.shape[1] / layer_s,
            "pregate_flops_per_token_layer": 2 * cfg.decoder.d_model * store.num_experts,
            "head_flops_per_token_layer": 2 * (hints.cfg.head_params - cfg.decoder.d_model),
            "head_params_per_layer": hints.cfg.head_params,
            "head_bytes_all_layers": head_bytes * hints.cfg.num_layers,
            "expert_bytes": store.expert_bytes, "total_expert_bytes": store.total_bytes,
            "heads_vs_one_expert": head_bytes * hints.cfg.num_layers / store.expert_bytes,
            "bytes_saved_at_25pct": store.total_bytes - store.total_bytes // 4}


def vlm_domain(plan: StudyConfig, runs: pathlib.Path, out: pathlib.Path) -> None:
    """Step 7: traces, predictors and offload bench on the trained hard-MoE VLM's prompts."""
    recipe = Recipe(data=str(runs / "data" / "synthetic"), out=str(runs / "vlm"))
    _, _, model_dir = train_family(plan.vlm_family, recipe)[1]
    traces = {}
    for split, n in (("train", plan.vlm_questions), ("dev", 128)):
        traces[split] = traced(runs / "traces" / f"{plan.vlm_family}-hard-vlm-{split}.npz", n,
                               lambda: trace_benchmark(model_dir, split=split, questions=n,
                                                       data=recipe.data, hidden=True)[0])
    name = f"{plan.vlm_family}-hard-vlm"
    rpps = {"rpp d_model 32, token ids": PredictorShape(gen_len=4),
            "rpp d_model 128, token ids": PredictorShape(gen_len=4, d_model=128, d_ff=512),
            "rpp d_model 128, token ids + image states": PredictorShape(
                gen_len=4, d_model=128, d_ff=512, states=True)}
    folders = dict(zip(rpps, ("", "-wide", "-wide-states")))
    rpps = {label: predictor(traces["train"], runs / "rpp" / f"{name}{folders[label]}", 4,
                             plan.predictor_steps, shape) for label, shape in rpps.items()}
    heads = head_set(traces["train"], runs / "heads" / name, plan,
                     HeadShape(hidden=plan.head_hidden))
    result = {label: evaluate_predictors([traces["dev"]], traces["train"], rpp,
                                         [heads] if i == 0 else [])
              for i, (label, rpp) in enumerate(rpps.items())}
    rpp = rpps["rpp d_model 128, token ids + image states"]
    (out / "vlm_eval.json").write_text(json.dumps(result, indent=1))
    text = "## Predictors trained on VLM prompts (train split), evaluated on the dev split\n\n"
    text += "\n\n".join(f"### {k}\n\n" + markdown(r) for k, r in result.items())
    (out / "vlm_eval.md").write_text(text + "\n")
    print(text)
    offload_grid.bench(offload_grid.OffloadBenchConfig(
        checkpoint=str(model_dir), domain="vlm", data=recipe.data,
        policies=bench_policies(rpp, heads), budgets=("100%", "25%", "12.5%"),
        batch_sizes=(1, 4), new_tokens=4, repeats=plan.bench_repeats, out=str(out / "offload_vlm")))


def scheduler_study(cfg, params, predictor, heads, trace, new_tokens: int,
                    batch: int = 4) -> dict:
    """Token-level scheduling at every decode step: the next tokens of 2 x `batch` adjacent
    held-out requests are re-split by the scheduler on each prediction of their routes at that
    position -- rpp (the routing-path predictor, at admission), tlp (the previous token's true
    routes, known before the step), lookahead (the RPP for the first MoE layer, the d = 1 heads
    for the others: the best prediction here, though the heads read the step's own hidden
    states, so a real scheduler would have them only layer by layer) and the true routes (the
    scheduler's ceiling). Reported per prediction: distinct experts summed over steps, layers and
    both batches (true routes) against FIFO, the reduction, scheduling time, and decode tokens/s
    of the orders replayed through the simulator under lru at 25 % (copy time calibrated on this
    machine, compute time per layer visit from the engine's all-resident decode)."""
    rpp_cfg, rparams = load_predictor(predictor)
    ex = examples(trace, rpp_cfg.gen_len)
    p, k = ex.tokens.shape[1], rpp_cfg.top_k
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    prior = frequency_prior(flat(ex.routes), flat(ex.route_mask))
    rpp_scores = predict(rpp_cfg, rparams, ex.tokens, ex.mask)
    head_cfg, hparams = load_heads(heads)
    d1, _ = layer_scores(head_cfg, head_probabilities(head_cfg, hparams, trace.hidden), 1, prior)
    combined = on_grid(ex, d1, prior)
    combined[:, :, 0] = rpp_scores[:, :, 0]
    predictions = {"rpp": topk_sets(rpp_scores, k),
                   "tlp": topk_sets(baselines(ex, prior)["tlp"], k),
                   "lookahead": topk_sets(combined, k), "true_routes": ex.routes}
    store = ExpertStore.from_params(cfg, params)
    for _ in range(2):                                   # the first run compiles
        ref = reference_run(cfg, store, ex.tokens[:batch], ex.mask[:batch],
                            new_tokens=new_tokens)
    t = ref.timings
    compute = ComputeModel(t["decode_s"] / max(t["decode_steps"] * len(store.layers), 1))
    transfer = TransferModel(bandwidth_bytes_per_s=store.expert_bytes / ref.calibrate_copy(),
                             latency_s=0.0)
    orders = ["fifo", *predictions]
    totals = dict.fromkeys(orders, 0)
    streams = {o: [] for o in orders}
    times = {o: [] for o in predictions}
    fifo = (np.arange(batch), np.arange(batch, 2 * batch))
    steps = 0
    for s in range(0, len(ex) - 2 * batch + 1, 2 * batch):
        idx = np.arange(s, s + 2 * batch)
        for g in range(rpp_cfg.gen_len):
            if not (ex.route_mask[idx, p + g] > 0).all():
                continue
            steps += 1
            truth = ex.routes[idx, p + g]                                   # (2T, L, E)
            splits = {"fifo": fifo}
            for name, pred in predictions.items():
                t0 = time.perf_counter()
                splits[name] = schedule(pred[idx, p + g])
                times[name].append(time.perf_counter() - t0)
            for name, halves in splits.items():
                totals[name] += objective(truth, *halves)
                for half in halves:
                    used = truth[half].any(0)                               # (L, E)
                    streams[name] += [Visit(layer, frozenset(np.flatnonzero(used[li]).tolist()),
                                            tokens=batch)
                                      for li, layer in enumerate(store.layers)]
    slots = store.total_bytes // 4 // store.expert_bytes
    sims = {}
    for name, stream in streams.items():
        r = simulate_stream(stream, "lru", slots, store.layers, store.num_experts,
                            store.expert_bytes, transfer, compute)
        sims[name] = {"tokens_per_s": r.tokens_per_s, "loads": r.stats.loads,
                      "hit_rate": r.hit_rate}
    return {"batch": batch, "steps_scheduled": steps,
            "distinct_experts_sum": totals,
            "reduction_vs_fifo": {n: 1 - totals[n] / max(totals["fifo"], 1) for n in predictions},
            "schedule_ms_median": {n: 1e3 * statistics.median(v) if v else None
                                   for n, v in times.items()},
            "simulated_decode_lru_25pct": sims, "compute_s_per_visit": compute.seconds_per_layer,
            "copy_s_per_expert": store.expert_bytes / transfer.bandwidth_bytes_per_s,
            "layers": len(trace.moe_layers), "experts": trace.num_experts}
