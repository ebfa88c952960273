"""`moex bench offload`: expert-offload policies x expert budgets x batch sizes on one model.

    moex bench offload                                  # small-hard, budgets 100/50/25/12.5 %
    moex bench offload --preset tiny-hard --batch 1 --budgets 0.5 --repeats 2 --out /tmp/x
    moex bench offload --checkpoint ckpt/mixtral-tiny   # a converted checkpoint (moex format)

Per batch size B: B prompts of random tokens (lengths drawn in [T/2, T], left-padded), greedy
generation of N new tokens through the live engine (`moex.offload.engine`). First the
all-resident engine runs -- the baseline, measured in the same run -- after one warm-up
generate (the engines of a config share their compiled pieces, so no other point compiles).
Its trace gives the oracle forecast and Belady's hit rate at each budget; an all-resident run on
other prompts gives the frequency prior. Every (budget, policy) point then runs `repeats`
generates, each from a cold pool; decode tokens/s = B x steps / decode time (median, min, max).

Columns: hit rate (needed experts found resident, prefetched ones included), reuse rate
(1 - loads / accesses), Belady's hit rate at the same budget on the baseline's trace
(`moex.offload.cache.belady_bound`, which bounds every policy's reuse rate), prefetches used / wasted, bytes moved
host -> device, stall fraction (decode time spent waiting for copies), hidden fraction
(1 - stall / total copy time, the copy time estimated from a calibrated single-expert copy),
the pool's bytes (preallocated: its peak) and the decode throughput bound min(compute-bound =
all-resident decode, transfer-bound = decode tokens / decode copy time). Results: results.csv,
results.json (config, environment) and report.md under --out.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics

import jax.numpy as jnp
import numpy as np

from moex.checkpoint import LoadedModel, load_model
from moex.data import SyntheticSpec, read_mmbench, write_synthetic
from moex.measure import tree_bytes, write_outputs
from moex.offload.cache import belady_bound, stream_from_trace
from moex.offload.engine import OffloadEngine, hidden_fraction
from moex.offload.forecast import reference_run
from moex.offload.spec import PolicySpec, budget_slots, parse_budget, parse_policy
from moex.offload.store import ExpertStore
from moex.predict.corpus import samples
from moex.predict.forecast import make_forecaster, make_lookahead
from moex.predict.vlm import vlm_prompts
from moex.tokenizer import left_pad

DEFAULT_POLICIES = ("all-resident", "on-demand", "lru", "lfu", "pregated", "predictive:prior",
                    "predictive:oracle")


@dataclasses.dataclass(frozen=True)
class OffloadBenchConfig:
    preset: str = "small-hard"
    checkpoint: str | None = None
    policies: tuple[str, ...] = DEFAULT_POLICIES
    budgets: tuple[str, ...] = ("100%", "50%", "25%", "12.5%")
    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_len: int = 32
    new_tokens: int = 16
    repeats: int = 5
    seed: int = 0
    domain: str = "random"                 # prompts: random tokens, stdlib code / prose, or
                                           # vlm (synthetic MMBench dev questions with images)
    data: str = "runs/data/synthetic"      # synthetic benchmark root (domain vlm)
    out: str = "results/offload"


def model_of(grid: OffloadBenchConfig) -> LoadedModel:
    return load_model(grid.checkpoint or grid.preset, grid.seed)


def prompts(model: LoadedModel, batch: int, length: int, seed: int, domain: str = "random",
            data: str = "runs/data/synthetic"):
    """(ids, mask, images or None) of B prompts: random tokens of lengths in [T/2, T]
    (left-padded), held-out windows of T bytes of the stdlib corpus (`domain` code / prose), or
    (vlm) the compact prompts of B synthetic MMBench dev questions from `seed` on, with their
    images, in the model's tokenizer (T is then their own length)."""
    cfg = model.cfg
    if domain == "vlm":
        if cfg.vision is None:
            raise ValueError(f"domain vlm needs a VLM; {cfg.name} has no vision tower")
        questions = read_mmbench(write_synthetic(data, SyntheticSpec())["mmbench/dev"])
        start = seed % max(1, len(questions) - batch)
        ids, mask, images = vlm_prompts(cfg, model.tokenizer, questions[start:start + batch])
        return ids, mask, jnp.asarray(images)
    if domain != "random":
        ids = samples(domain, "heldout", batch, length, seed)
        return ids, np.ones_like(ids), None
    rng = np.random.default_rng(seed)
    high = min(cfg.decoder.vocab_size, 256)
    rows = [rng.integers(0, high, rng.integers(max(1, length // 2), length + 1)).tolist()
            for _ in range(batch)]
    return (*left_pad(rows, cfg.pad_token_id), None)


def cold_runs(cfg, store, policy: str, forecaster, budget: int, prompts, new_tokens: int,
              repeats: int, warmup: bool = False,
              lookahead=None) -> tuple[list[dict], OffloadEngine]:
    """`repeats` greedy generates of `prompts` = (ids, mask, images), each from a cold pool
    (after one untimed one with `warmup`: a new pool size compiles its slot update and expert
    pieces): per run the engine's timings, hit rate and bytes loaded; and the last engine."""
    runs, eng = [], None
    for i in range(repeats + warmup):
        eng = OffloadEngine(cfg, None, policy, budget, forecaster=forecaster, store=store,
                            lookahead=lookahead)
        eng.generate(*prompts, max_new_tokens=new_tokens, stop_tokens=())
        if i >= warmup:
            runs.append({**eng.timings, "hit_rate": eng.core.stats.hit_rate,
                         "bytes_moved": eng.pool.bytes_loaded})
    return runs, eng


def run_point(cfg, store, policy, forecaster, budget, ids, mask, images, grid,
              warmup: bool = False, lookahead=None) -> tuple[dict, OffloadEngine]:
    """Decode tokens/s (median, min, max), prefill tokens/s and stall fraction (medians) over
    `repeats` cold-pool generates."""
    runs, eng = cold_runs(cfg, store, policy, forecaster, budget, (ids, mask, images),
                          grid.new_tokens, grid.repeats, warmup, lookahead)
    rates = [ids.shape[0] * t["decode_steps"] / t["decode_s"] for t in runs]
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_min": min(rates),
            "decode_tok_s_max": max(rates),
            "prefill_tok_s": statistics.median(int(mask.sum()) / t["prefill_s"] for t in runs),
            "stall_fraction": statistics.median(t["decode_stall_s"] / t["decode_s"]
                                                for t in runs)}, eng


def run(grid: OffloadBenchConfig, progress: bool = True, model: LoadedModel | None = None,
        store: ExpertStore | None = None) -> tuple[list[dict], list[str]]:
    """The grid's rows, and the points not run (budget below a policy's minimum); `model`
    (and its `store`): a model in memory instead of the grid's preset or checkpoint."""
    from tqdm import tqdm
    model = model or model_of(grid)
    cfg = model.cfg
    store = store or ExpertStore.from_params(cfg, model.params)
    dense_bytes = tree_bytes(store.dense_params)
    budgets = [(b, parse_budget(b, store.total_bytes)) for b in grid.budgets]
    specs = [parse_policy(p) for p in grid.policies]
    points = [(bud, spec) for bud in budgets for spec in specs
              if spec.policy != "all-resident" or bud[1] >= store.total_bytes]
    bar = tqdm(total=len(grid.batch_sizes) * (len(points) + 1), disable=not progress,
               desc="offload")
    copy_s = OffloadEngine(cfg, None, "on-demand", store.expert_bytes,
                           store=store).calibrate_copy()
    rows, skipped = [], []
    for batch in grid.batch_sizes:
        ids, mask, images = prompts(model, batch, grid.prompt_len, grid.seed + batch, grid.domain,
                                    grid.data)
        bar.set_postfix_str(f"B={batch} all-resident baseline")
        base, ref = run_point(cfg, store, "all-resident", None, store.total_bytes, ids, mask,
                              images, grid, True)
        warm = {ref.pool.num_slots}
        trace = ref.trace()
        calibration = reference_run(cfg, store, *prompts(model, batch, grid.prompt_len,
                                                         grid.seed + 1000 + batch, grid.domain,
                                                         grid.data),
                                    new_tokens=grid.new_tokens).trace()
        forecasters = {spec: make_forecaster(spec, trace, calibration) for spec in specs}
        heads = {spec: make_lookahead(spec) for spec in specs}
        bar.update()
        for (label, budget), spec in points:
            bar.set_postfix_str(f"B={batch} {label} {spec.label}")
            slots = budget_slots(budget, store.expert_bytes)
            try:
                timing, eng = run_point(cfg, store, spec.policy, forecasters[spec], budget,
                                        ids, mask, images, grid, warmup=slots not in warm,
                                        lookahead=heads[spec])
                warm.add(slots)
            except ValueError as e:                 # a budget below the policy's minimum
                skipped.append(f"B={batch} {label} {spec.label}: {e}")
            else:
                rows.append(point_row(cfg, store, dense_bytes, eng, timing, base, trace, copy_s,
                                      spec, label, budget, ids, grid))
            bar.update()
    bar.close()
    return rows, skipped


def point_row(cfg, store, dense_bytes: int, eng, timing: dict, base: dict, trace, copy_s: float,
              spec: PolicySpec, label: str, budget: int, ids, grid: OffloadBenchConfig) -> dict:
    """One result row: the point's timing, its cache counts, bytes moved, memory and bounds."""
    s, t = eng.core.stats, eng.timings
    batch, slots = ids.shape[0], eng.pool.num_slots
    copy_decode = t["decode_loads"] * copy_s
    transfer_bound = batch * t["decode_steps"] / copy_decode if copy_decode else float("inf")
    return {
        "model": cfg.name, "batch": batch, "prompt_len": int(ids.shape[1]),
        "new_tokens": grid.new_tokens, "budget": label, "budget_bytes": budget,
        "budget_fraction": budget / store.total_bytes, "policy": spec.label, "slots": slots,
        **timing,
        "ratio_to_all_resident": timing["decode_tok_s"] / base["decode_tok_s"],
        "hit_rate": s.hit_rate, "reuse_rate": s.reuse_rate,
        "belady_hit_rate": belady_bound(stream_from_trace(trace), slots).hit_rate,
        "misses": s.misses, "prefetches": s.prefetches, "prefetch_used": s.prefetch_used,
        "prefetch_wasted": s.prefetch_wasted, "extra_rounds": s.extra_rounds,
        "bytes_moved": eng.pool.bytes_loaded,
        "decode_bytes_moved": t["decode_loads"] * store.expert_bytes,
        "stall_s": eng.stats.stall_s,
        "hidden_fraction": hidden_fraction(eng.stats.stall_s, s.loads * copy_s),
        "peak_pool_bytes": eng.pool.pool_bytes,
        "device_param_bytes": dense_bytes + eng.pool.pool_bytes,
        "memory_kind": store.memory_kind,
        "bound_decode_tok_s": min(base["decode_tok_s"], transfer_bound),
        "copy_s_per_expert": copy_s,
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| B | budget | policy | slots | decode tok/s (min-max) | x all-res | hit | reuse "
            "| Belady hit | prefetch used/wasted | MB moved | stall % | hidden % | pool MB "
            "| bound tok/s |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['budget']} | {r['policy']} | {r['slots']} "
            f"| {r['decode_tok_s']:.1f} ({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}) "
            f"| {r['ratio_to_all_resident']:.2f} | {r['hit_rate']:.2f} | {r['reuse_rate']:.2f} "
            f"| {r['belady_hit_rate']:.2f} | {r['prefetch_used']}/{r['prefetch_wasted']} "
            f"| {r['bytes_moved'] / 1e6:.1f} | {100 * r['stall_fraction']:.0f} "
            f"| {100 * r['hidden_fraction']:.0f} | {r['peak_pool_bytes'] / 1e6:.1f} "
            f"| {r['bound_decode_tok_s']:.1f} |")
    return "\n".join(lines)


def bench(grid: OffloadBenchConfig) -> pathlib.Path:
    """Run the grid, write results.csv, results.json and report.md under grid.out, print the
    table; returns the output folder."""
    for spec in grid.policies:
        parse_policy(spec)
    if grid.new_tokens < 2 or grid.repeats < 1:
        raise ValueError(f"need --new-tokens >= 2 (decode steps to time) and --repeats >= 1, "
                         f"found {grid.new_tokens} and {grid.repeats}")
    rows, skipped = run(grid)
    if not rows:
        raise ValueError("no grid point ran:\n" + "\n".join(skipped))
    table = markdown_table(rows)
    if skipped:
        table += "\n\nNot run (budget below the policy's minimum):\n" + \
            "\n".join(f"- {s}" for s in skipped)
    out = write_outputs(grid.out, rows, dataclasses.asdict(grid),
                        f"# Expert offload: {rows[0]['model']}\n\nPrompts up to "
                        f"{grid.prompt_len} tokens, {grid.new_tokens} new tokens, greedy; medians of "
                        f"{grid.repeats} cold-pool runs; ratios against all-resident measured in "
                        f"the same run; memory kind {rows[0]['memory_kind']}.\n\n{table}")
    print(table)
    print(f"\nwrote {out}/results.csv, results.json, report.md")
    return out
