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

import argparse
import dataclasses
import re
import statistics

import jax.numpy as jnp
import numpy as np

from moex.bench.memory import tree_bytes
from moex.bench.output import write_outputs
from moex.offload.cache import belady_bound, stream_from_trace
from moex.offload.engine import OffloadEngine, hidden_fraction
from moex.offload.forecast import OracleForecast, PriorForecast
from moex.offload.store import ExpertStore
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


def parse_budget(text: str, total_bytes: int) -> int:
    """'25%' or '0.25' (a fraction of all expert bytes), or bytes: '64MB', '1.5GiB', '123456'."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9.]+)\s*(%|[kKmMgGtT]i?[bB]|[bB])?", s)
    if not m:
        raise ValueError(f"expert budget {text!r}: expected a percentage ('25%'), a fraction "
                         "('0.25') or bytes ('64MB', '1.5GiB')")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%" or (unit is None and value <= 1):
        fraction = value / 100 if unit == "%" else value
        if not 0 < fraction <= 1:
            raise ValueError(f"expert budget {text!r}: a fraction must be in (0, 1]")
        return int(fraction * total_bytes)
    if unit is None or unit.lower() == "b":
        return int(value)
    scale = 1024 if "i" in unit.lower() else 1000
    return int(value * scale ** "kmgt".index(unit[0].lower()) * scale)


def split_policy(spec: str) -> tuple[str, str | None]:
    """'predictive:oracle' -> ('predictive', 'oracle'); plain names carry no forecast.
    predictive:prior, predictive:oracle, or predictive:DIR (a routing-path predictor)."""
    name, _, forecast = spec.partition(":")
    if name == "predictive" and not forecast:
        raise ValueError(f"policy {spec!r}: predictive takes a forecast: predictive:prior, "
                         "predictive:oracle or predictive:PREDICTOR_DIR")
    if name != "predictive" and forecast:
        raise ValueError(f"policy {spec!r}: only predictive takes a forecast")
    return name, forecast or None


def load_model(bc: OffloadBenchConfig):
    if bc.checkpoint:
        from moex.checkpoint import load
        cfg, params, _ = load(bc.checkpoint)
        return cfg, params
    from moex.config import get_config
    from moex.model import init_params
    cfg = get_config(bc.preset)
    return cfg, init_params(cfg, bc.seed)


def prompts(cfg, batch: int, length: int, seed: int, domain: str = "random",
            checkpoint: str | None = None, data: str = "runs/data/synthetic"):
    """(ids, mask, images or None) of B prompts: random tokens of lengths in [T/2, T]
    (left-padded), held-out windows of T bytes of the stdlib corpus (`domain` code / prose), or
    (vlm) the compact prompts of B synthetic MMBench dev questions from `seed` on, with their
    images, in the model's tokenizer (T is then their own length)."""
    if domain == "vlm":
        if cfg.vision is None:
            raise ValueError(f"domain vlm needs a VLM; {cfg.name} has no vision tower")
        from moex.data import SyntheticSpec, read_mmbench, write_synthetic
        from moex.data.vocab import tokenizer_for
        from moex.predict.vlm import vlm_prompts
        questions = read_mmbench(write_synthetic(data, SyntheticSpec())["mmbench/dev"])
        start = seed % max(1, len(questions) - batch)
        ids, mask, images = vlm_prompts(cfg, tokenizer_for(cfg, checkpoint),
                                        questions[start:start + batch])
        return ids, mask, jnp.asarray(images)
    if domain != "random":
        from moex.predict.corpus import samples
        ids = samples(domain, "heldout", batch, length, seed)
        return ids, np.ones_like(ids), None
    rng = np.random.default_rng(seed)
    high = min(cfg.decoder.vocab_size, 256)
    rows = [rng.integers(0, high, rng.integers(max(1, length // 2), length + 1)).tolist()
            for _ in range(batch)]
    return (*left_pad(rows, cfg.pad_token_id), None)


def _median(xs):
    return statistics.median(xs), min(xs), max(xs)


def run_point(cfg, store, policy, forecaster, budget, ids, mask, images, bc,
              warmup: bool = False) -> tuple[dict, OffloadEngine]:
    """Medians over `repeats` cold-pool generates (after one untimed one with `warmup`: a new
    pool size compiles its slot update and expert pieces)."""
    rates, prefill, stall_fracs = [], [], []
    eng = None
    for i in range(bc.repeats + warmup):
        eng = OffloadEngine(cfg, None, policy, budget, forecaster=forecaster, store=store)
        eng.generate(ids, mask, images, max_new_tokens=bc.new_tokens, stop_tokens=())
        t = eng.timings
        if i < warmup:
            continue
        rates.append(ids.shape[0] * t["decode_steps"] / t["decode_s"])
        prefill.append(int(mask.sum()) / t["prefill_s"])
        stall_fracs.append(t["decode_stall_s"] / t["decode_s"])
    med, lo, hi = _median(rates)
    return {"decode_tok_s": med, "decode_tok_s_min": lo, "decode_tok_s_max": hi,
            "prefill_tok_s": statistics.median(prefill),
            "stall_fraction": statistics.median(stall_fracs)}, eng


def run(bc: OffloadBenchConfig, progress: bool = True) -> tuple[list[dict], list[str]]:
    """The grid's rows, and the points not run (budget below a policy's minimum)."""
    from tqdm import tqdm
    cfg, params = load_model(bc)
    store = ExpertStore.from_params(cfg, params)
    total = store.total_bytes
    dense_bytes = tree_bytes(store.dense_params)
    budgets = [(b, parse_budget(b, total)) for b in bc.budgets]
    specs = [split_policy(p) for p in bc.policies]
    points = [(b, bud, p) for b in bc.batch_sizes for bud in budgets for p in specs
              if p[0] != "all-resident" or bud[1] >= total]
    bar = tqdm(total=len(points) + len(bc.batch_sizes), disable=not progress, desc="offload")
    copy_s = OffloadEngine(cfg, None, "on-demand", store.expert_bytes,
                           store=store).calibrate_copy()
    rows, skipped = [], []
    for batch in bc.batch_sizes:
        ids, mask, images = prompts(cfg, batch, bc.prompt_len, bc.seed + batch, bc.domain,
                                    bc.checkpoint, bc.data)
        bar.set_postfix_str(f"B={batch} all-resident baseline")
        base, ref = run_point(cfg, store, "all-resident", None, total, ids, mask, images, bc,
                              True)
        warm = {ref.pool.num_slots}
        trace = ref.trace()
        calib = OffloadEngine(cfg, None, "all-resident", total, store=store)
        calib.generate(*prompts(cfg, batch, bc.prompt_len, bc.seed + 1000 + batch, bc.domain,
                                bc.checkpoint, bc.data),
                       max_new_tokens=bc.new_tokens, stop_tokens=())
        forecasters = {"oracle": OracleForecast(trace),
                       "prior": PriorForecast.from_trace(calib.trace())}
        for _, forecast in specs:
            if forecast not in (None, "oracle", "prior"):
                from moex.predict.train import PredictorForecast, load_predictor
                forecasters[forecast] = PredictorForecast(*load_predictor(forecast))
        bar.update()
        for (label, budget), (policy, forecast) in [(bud, p) for b, bud, p in points
                                                    if b == batch]:
            name = policy + (f":{forecast if forecast in ('oracle', 'prior') else 'rpp'}"
                             if forecast else "")
            bar.set_postfix_str(f"B={batch} {label} {name}")
            try:
                slots = budget // store.expert_bytes
                timing, eng = run_point(cfg, store, policy, forecasters.get(forecast), budget,
                                        ids, mask, images, bc, warmup=slots not in warm)
                warm.add(slots)
            except ValueError as e:                 # a budget below the policy's minimum
                skipped.append(f"B={batch} {label} {name}: {e}")
                bar.update()
                continue
            s, t = eng.core.stats, eng.timings
            slots = eng.pool.num_slots
            decode_tokens = batch * t["decode_steps"]
            copy_decode = t["decode_loads"] * copy_s
            transfer_bound = decode_tokens / copy_decode if copy_decode else float("inf")
            belady = belady_bound(stream_from_trace(trace), slots)
            rows.append({
                "model": cfg.name, "batch": batch, "prompt_len": int(ids.shape[1]),
                "new_tokens": bc.new_tokens, "budget": label, "budget_bytes": budget,
                "budget_fraction": budget / total, "policy": name, "slots": slots,
                **timing,
                "ratio_to_all_resident": timing["decode_tok_s"] / base["decode_tok_s"],
                "hit_rate": s.hit_rate, "reuse_rate": s.reuse_rate,
                "belady_hit_rate": belady.hit_rate, "misses": s.misses,
                "prefetches": s.prefetches, "prefetch_used": s.prefetch_used,
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
            })
            bar.update()
    bar.close()
    return rows, skipped


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = OffloadBenchConfig()
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--checkpoint", help="a moex checkpoint dir (e.g. converted) instead of "
                   "a randomly initialised preset")
    p.add_argument("--policies", nargs="+", default=list(d.policies),
                   help="policies; predictive:prior / predictive:oracle pick its forecaster")
    p.add_argument("--budgets", nargs="+", default=list(d.budgets),
                   help="expert budgets: '25%%', '0.25' or bytes ('64MB')")
    p.add_argument("--batch", type=int, nargs="+", default=list(d.batch_sizes))
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--domain", default=d.domain, choices=["random", "code", "prose", "vlm"],
                   help="prompts: random tokens, held-out stdlib code / prose bytes, or "
                        "synthetic MMBench questions with their images (vlm: a trained VLM "
                        "--checkpoint, e.g. runs/vlm/mini-hard/model)")
    p.add_argument("--data", default=d.data, help="synthetic benchmark root (--domain vlm)")
    p.add_argument("--out", default=d.out)


def main(args: argparse.Namespace) -> int:
    bc = OffloadBenchConfig(args.preset, args.checkpoint, tuple(args.policies),
                            tuple(args.budgets), tuple(args.batch), args.prompt_len,
                            args.new_tokens, args.repeats, args.seed, args.domain, args.data,
                            args.out)
    for spec in bc.policies:
        split_policy(spec)
    if bc.new_tokens < 2 or bc.repeats < 1:
        raise ValueError(f"need --new-tokens >= 2 (decode steps to time) and --repeats >= 1, "
                         f"found {bc.new_tokens} and {bc.repeats}")
    rows, skipped = run(bc)
    if not rows:
        raise ValueError("no grid point ran:\n" + "\n".join(skipped))
    table = markdown_table(rows)
    if skipped:
        table += "\n\nNot run (budget below the policy's minimum):\n" + \
            "\n".join(f"- {s}" for s in skipped)
    out = write_outputs(bc.out, rows, dataclasses.asdict(bc),
                        f"# Expert offload: {rows[0]['model']}\n\nPrompts up to "
                        f"{bc.prompt_len} tokens, {bc.new_tokens} new tokens, greedy; medians of "
                        f"{bc.repeats} cold-pool runs; ratios against all-resident measured in "
                        f"the same run; memory kind {rows[0]['memory_kind']}.\n\n{table}")
    print(table)
    print(f"\nwrote {out}/results.csv, results.json, report.md")
    return 0
