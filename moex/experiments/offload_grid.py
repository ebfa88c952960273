"""`moex bench offload`: expert-offload policies x expert budgets x batch sizes on one model.

    moex bench offload                                  # small-hard, budgets 100/50/25/12.5 %
    moex bench offload --preset tiny-hard --batch 1 --budgets 0.5 --repeats 2 --out /tmp/x
    moex bench offload --checkpoint ckpt/mixtral-tiny   # a converted checkpoint (moex format)
    moex bench offload --checkpoint ckpt/qwen3-vl-moe   # a VLM checkpoint: benchmark questions
                                                        # with images in its tokenizer
    moex bench offload --expert-dtype native int8 int4 --misses load low+upgrade host
                                                        # quantized stores, low-precision and
                                                        # host-computed misses

Per batch size B: B prompts (`--domain`: random tokens of lengths drawn in [T/2, T],
left-padded; held-out stdlib code / prose, in the model's tokenizer; or vlm, synthetic MMBench
dev questions with their images -- auto, the default, is vlm for a VLM checkpoint and random
tokens otherwise), greedy generation of N new tokens through the live engine
(`moex.offload.engine`). First the model without offloading runs -- the whole-model jitted
decode (`moex.generate.Generator`; `jitted_decode_tok_s` in every row of that batch), the
baseline every decode rate is a ratio to (`x jitted`) -- then the engine's all-resident (every expert preloaded into the pool:
the engine's own best, in its own row), after one warm-up generate (the engines of a config
share their compiled pieces, so no other point compiles).
The all-resident run's trace gives the oracle forecast and Belady's hit rate at each budget; an all-resident run on
other prompts gives the frequency prior. Every (budget, policy) point then runs `repeats`
generates, each from a cold pool (all-resident: a preloaded one); decode tokens/s = B x steps / decode time (median, min, max).

Each policy point runs once per expert dtype (`--expert-dtype`: the store's copy, native / int8 /
int4, `moex.offload.quant`), miss option (`--misses`: load, low[:FMT][+upgrade], host[+fill],
`moex.offload.misses`; the cost model is measured here by `OffloadEngine.miss_costs`) and slot
form (`--slots`: dequantized, or quantized -- slots keep a quantized store's copies, more per
byte). The baseline is the native all-resident engine.

Columns: decode tokens/s and its ratio to the jitted decode and to the engine's all-resident,
the layers recomputed after an optimistic dispatch read an unresident expert (per run), hit
rate (needed experts found resident, prefetched ones included), reuse rate
(1 - loads / accesses), Belady's hit rate at the same budget on the baseline's trace
(`moex.offload.cache.belady_bound`, which bounds every cold-pool policy's reuse rate; 1.0 for
the preloaded all-resident), prefetches used / wasted, bytes moved
host -> device, the pool's bytes (preallocated: its peak) and the decode throughput bound min(compute-bound =
all-resident decode, transfer-bound = decode tokens / decode copy time, the copy time estimated
from a calibrated single-expert copy). results.csv also keeps the host's stall on copies (the
encoder-decoder engine waits for them on the host; the decoder engine's pieces wait on the
device, inside their decode time) and the hidden fraction. Results: results.csv,
results.json (config, environment) and report.md under --out.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import EncDecConfig
from moex.checkpoint import LoadedModel, load_model
from moex.data import SyntheticSpec, read_mmbench, write_synthetic
from moex.generate import decode_loop, generator_for, stop_ids
from moex.measure import tree_bytes, write_outputs
from moex.offload.cache import belady_bound, stream_from_trace
from moex.offload.engine import OffloadEngine, hidden_fraction
from moex.offload.misses import MissRule, parse_misses
from moex.offload.quant import label as dtype_label, parse_expert_dtype
from moex.offload.spec import PolicySpec, budget_slots, parse_budget, parse_policy
from moex.offload.seq2seq_engine import engine_class, reference_for
from moex.offload.store import ExpertStore
from moex.predict.corpus import samples
from moex.predict.forecast import make_forecaster, make_lookahead
from moex.predict.vlm import vlm_prompts
from moex.seq2seq import Seq2SeqGenerator
from moex.tokenizer import IMAGE_TAG, ByteTokenizer, left_pad

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
    expert_dtype: tuple[str, ...] = ("native",)    # the store's copy: native, int8, int4[:G]
    misses: tuple[str, ...] = ("load",)            # load | low[:FMT][+upgrade] | host[+fill]
    slots: tuple[str, ...] = ("dequantized",)      # quantized: slots keep int8 / int4 copies
    domain: str = "auto"                   # prompts: random tokens, stdlib code / prose, vlm
                                           # (synthetic MMBench dev questions with images), or
                                           # auto: vlm for a VLM checkpoint, else random
    data: str = "runs/data/synthetic"      # synthetic benchmark root (domain vlm)
    style: str = "compact"                 # domain vlm: prompt style (moex.data.prompts.STYLES)
    template: str = "{prompt}"             # domain vlm: chat template around the prompt
    out: str = "results/offload"


def model_of(grid: OffloadBenchConfig) -> LoadedModel:
    return load_model(grid.checkpoint or grid.preset, grid.seed)


def domain_of(grid: OffloadBenchConfig, model: LoadedModel) -> str:
    """The prompts' domain: grid.domain, where "auto" means the checkpoint's own task -- a
    checkpoint with a vision tower (trained or converted VLM) answers benchmark questions with
    images in its own tokenizer (vlm); a text checkpoint or a preset's random weights get
    random tokens."""
    if grid.domain != "auto":
        return grid.domain
    return "vlm" if grid.checkpoint and model.cfg.vision is not None else "random"


def prompts(model: LoadedModel, batch: int, length: int, seed: int, domain: str = "random",
            data: str = "runs/data/synthetic", style: str = "compact",
            template: str = "{prompt}"):
    """(ids, mask, images or None) of B prompts: random tokens of lengths in [T/2, T]
    (left-padded; never the image placeholder), held-out windows of the stdlib corpus
    (`domain` code / prose: T bytes, or for a model with a tokenizer.json the first T tokens
    of such a window in it), or (vlm) the prompts (`style`, `template`) of B synthetic MMBench
    dev questions from `seed` on, with their images, in the model's tokenizer (T is then their
    own length)."""
    cfg = model.cfg
    if domain == "vlm":
        if cfg.vision is None:
            raise ValueError(f"domain vlm needs a VLM; {cfg.name} has no vision tower")
        questions = read_mmbench(write_synthetic(data, SyntheticSpec())["mmbench/dev"])
        start = seed % max(1, len(questions) - batch)
        ids, mask, images = vlm_prompts(cfg, model.tokenizer, questions[start:start + batch],
                                        style, template=template)
        return ids, mask, jnp.asarray(images)
    if domain not in ("random", "code", "prose"):
        raise ValueError(f"unknown prompt domain {domain!r}; expected auto, random, code, prose "
                         "or vlm")
    if domain != "random":
        return corpus_prompts(model, batch, length, seed, domain)
    rng = np.random.default_rng(seed)
    high = min(cfg.vocab_size, 256)
    rows = [rng.integers(0, high, rng.integers(max(1, length // 2), length + 1))
            for _ in range(batch)]
    if cfg.vision is not None and cfg.image_token_id < high:   # a placeholder needs an image
        for r in rows:
            r[r == cfg.image_token_id] = (cfg.image_token_id + 1) % high
    return (*left_pad([r.tolist() for r in rows], cfg.pad_token_id,
                      right=isinstance(cfg, EncDecConfig)), None)     # encoder inputs: right


def corpus_prompts(model: LoadedModel, batch: int, length: int, seed: int, domain: str):
    """(ids, mask, None): B held-out stdlib windows of T bytes -- the ids themselves for a
    byte-level model, else each window's text in the model's tokenizer, cut to T tokens and
    left-padded (a tokenizer that does not know the corpus's words, e.g. the synthetic
    benchmark's, reads mostly <unk>)."""
    windows = samples(domain, "heldout", batch, length, seed)
    if isinstance(model.tokenizer, ByteTokenizer):
        return windows, np.ones_like(windows), None
    tok = model.tokenizer
    rows = [tok.encode(bytes(w.astype(np.uint8)).decode("utf-8", "replace")
                       .replace(IMAGE_TAG, ""))[:length] for w in windows]
    return (*left_pad(rows, tok.pad_id), None)


def jitted_decode(cfg, params, prompts, new_tokens: int, repeats: int) -> dict:
    """The model without offloading on the same prompts = (ids, mask, images): the whole-model
    jitted prefill and decode step (`moex.generate.Generator`; `moex.seq2seq.Seq2SeqGenerator`
    for an encoder-decoder), greedy, every row N steps; decode tokens/s = B x (N - 1) / decode
    time (median, min, max) over `repeats` runs after a warm-up."""
    ids, mask, images = prompts
    b, t = ids.shape
    stop = jnp.asarray(stop_ids(cfg, ()))
    if isinstance(cfg, EncDecConfig):
        gen = Seq2SeqGenerator(cfg)
        first_of = lambda: gen.start(params, ids, mask, max_len=new_tokens)
    else:
        gen = generator_for(cfg)
        first_of = lambda: gen.prefill(params, ids, mask, images, max_len=t + new_tokens)
    rates = []
    for _ in range(repeats + 1):                          # the first compiles
        first = jax.block_until_ready(first_of())
        start = time.perf_counter()
        decode_loop(cfg, lambda *a: gen.step(params, *a), first, stop, new_tokens, False)
        rates.append(b * (new_tokens - 1) / (time.perf_counter() - start))
    rates = rates[1:]
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_min": min(rates),
            "decode_tok_s_max": max(rates)}


def preloaded(cfg, policy: str) -> bool:
    """The bench runs this policy from a pool preloaded with every expert (all-resident on the
    decoder engine: the model as it runs without offloading)."""
    return policy == "all-resident" and not isinstance(cfg, EncDecConfig)


def cold_runs(cfg, store, policy: str, forecaster, budget: int, prompts, new_tokens: int,
              repeats: int, warmup: bool = False, lookahead=None, misses=None,
              quantized_slots: bool = False) -> tuple[list[dict], OffloadEngine]:
    """`repeats` greedy generates of `prompts` = (ids, mask, images), each from a cold pool --
    all-resident's preloaded with every expert, the model as it runs without offloading --
    (after one untimed one with `warmup`: a new pool size compiles its slot update and expert
    pieces): per run the engine's timings, hit rate and bytes loaded; and the last engine."""
    runs, eng = [], None
    decoder = not isinstance(cfg, EncDecConfig)
    for i in range(repeats + warmup):
        kw = {"warm": True} if preloaded(cfg, policy) else {}
        eng = engine_class(cfg)(cfg, None, policy, budget, forecaster=forecaster, store=store,
                                lookahead=lookahead, misses=misses,
                                quantized_slots=quantized_slots, **kw)
        if i < warmup and decoder:     # compile the per-layer pieces too (a fused forward
            engine_class(cfg)(cfg, None, policy, budget, forecaster=forecaster, store=store,
                              lookahead=lookahead, misses=misses, fuse=False,
                              quantized_slots=quantized_slots, **kw).generate(
                *prompts, max_new_tokens=new_tokens, stop_tokens=())   # recomputes by them)
        eng.generate(*prompts, max_new_tokens=new_tokens, stop_tokens=())
        if i >= warmup:
            runs.append({**eng.timings, "hit_rate": eng.core.stats.hit_rate,
                         "bytes_moved": eng.pool.bytes_loaded,
                         "recomputed": eng.stats.recomputed_layers})
    return runs, eng


def run_point(cfg, store, policy, forecaster, budget, ids, mask, images, grid,
              warmup: bool = False, lookahead=None, misses=None,
              quantized_slots: bool = False) -> tuple[dict, OffloadEngine]:
    """Decode tokens/s (median, min, max), prefill tokens/s, stall fraction and recomputed
    layers per generate (medians) over `repeats` cold-pool generates."""
    runs, eng = cold_runs(cfg, store, policy, forecaster, budget, (ids, mask, images),
                          grid.new_tokens, grid.repeats, warmup, lookahead, misses,
                          quantized_slots)
    rates = [ids.shape[0] * t["decode_steps"] / t["decode_s"] for t in runs]
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_min": min(rates),
            "decode_tok_s_max": max(rates),
            "prefill_tok_s": statistics.median(int(mask.sum()) / t["prefill_s"] for t in runs),
            "stall_fraction": statistics.median(t["decode_stall_s"] / t["decode_s"]
                                                for t in runs),
            "recomputed": statistics.median(t["recomputed"] for t in runs)}, eng


def run(grid: OffloadBenchConfig, progress: bool = True, model: LoadedModel | None = None,
        store: ExpertStore | None = None) -> tuple[list[dict], list[str]]:
    """The grid's rows, and the points not run (budget below a policy's minimum); `model`
    (and its `store`): a model in memory instead of the grid's preset or checkpoint."""
    from tqdm import tqdm
    model = model or model_of(grid)
    cfg = model.cfg
    store = store or ExpertStore.from_params(cfg, model.params)
    domain = domain_of(grid, model)
    dense_bytes = tree_bytes(store.dense_params)
    budgets = [(b, parse_budget(b, store.total_bytes)) for b in grid.budgets]
    specs = [parse_policy(p) for p in grid.policies]
    variants = variants_of(grid, model, store)
    points = [(bud, spec, var) for bud in budgets for spec in specs for var in variants
              if spec.policy != "all-resident" or bud[1] >= store.total_bytes]
    bar = tqdm(total=len(grid.batch_sizes) * (len(points) + 1), disable=not progress,
               desc="offload")
    rows, skipped = [], []
    for batch in grid.batch_sizes:
        ids, mask, images = prompts(model, batch, grid.prompt_len, grid.seed + batch, domain,
                                    grid.data, grid.style, grid.template)
        bar.set_postfix_str(f"B={batch} jitted (no offload) baseline")
        jit = jitted_decode(cfg, model.params, (ids, mask, images), grid.new_tokens, grid.repeats)
        bar.set_postfix_str(f"B={batch} all-resident")
        base, ref = run_point(cfg, store, "all-resident", None, store.total_bytes, ids, mask,
                              images, grid, True)
        warm = {(ref.pool.num_slots, "native", False)}
        trace = ref.trace()
        calibration = reference_for(cfg, store, *prompts(model, batch, grid.prompt_len,
                                                         grid.seed + 1000 + batch, domain,
                                                         grid.data, grid.style, grid.template),
                                    new_tokens=grid.new_tokens).trace()
        forecasters = {spec: make_forecaster(spec, trace, calibration) for spec in specs}
        heads = {spec: make_lookahead(spec) for spec in specs}
        bar.update()
        for (label, budget), spec, var in points:
            name = f"B={batch} {label} {spec.label} {var.label}"
            bar.set_postfix_str(name)
            slots = budget_slots(budget, store.expert_bytes)
            form = (slots, var.fmt, var.quantized)
            try:
                timing, eng = run_point(cfg, var.store, spec.policy, forecasters[spec], budget,
                                        ids, mask, images, grid, warmup=form not in warm,
                                        lookahead=heads[spec], misses=var.rule,
                                        quantized_slots=var.quantized)
                warm.add(form)
            except ValueError as e:                 # a budget below the policy's minimum
                skipped.append(f"{name}: {e}")
            else:
                rows.append({**point_row(cfg, var, dense_bytes, eng, timing, base, trace,
                                         spec, label, budget, ids, grid), "domain": domain,
                             "ratio_to_jitted": timing["decode_tok_s"] / jit["decode_tok_s"],
                             "jitted_decode_tok_s": jit["decode_tok_s"]})
            bar.update()
    bar.close()
    return rows, skipped


@dataclasses.dataclass(frozen=True)
class Variant:
    """How experts move at a point: the store (its dtype and low-precision copy) and the miss
    rule (None: load every miss whole), with the measured copy time of one stored expert."""
    store: ExpertStore
    misses: str
    rule: MissRule | None
    copy_s: float
    quantized: bool = False                 # slots keep the quantized copies

    @property
    def fmt(self) -> str:
        return dtype_label(self.store.fmt)

    @property
    def label(self) -> str:
        return f"{self.fmt}/{self.misses}" + ("/quantized" if self.quantized else "")


def variants_of(grid: OffloadBenchConfig, model: LoadedModel,
                store: ExpertStore) -> list[Variant]:
    """One Variant per (expert dtype, miss option, slot form): stores built once per (dtype,
    low copy), the cost model measured once per store; quantized slots only where they apply
    (an int8 / int4 store without a low-precision copy)."""
    stores, costs, out = {(None, None): store}, {}, []
    if isinstance(model.cfg, EncDecConfig):           # the encoder-decoder engine: plain loads
        if (tuple(grid.expert_dtype), tuple(grid.misses), tuple(grid.slots)) != (
                ("native",), ("load",), ("dequantized",)):
            raise ValueError(f"{model.cfg.name}: the encoder-decoder engine runs native experts "
                             "with plain loads (--expert-dtype native --misses load --slots "
                             "dequantized)")
        probe = engine_class(model.cfg)(model.cfg, None, "on-demand", store.expert_bytes,
                                        store=store)
        return [Variant(store, "load", None, probe.calibrate_copy())]
    for dtype in grid.expert_dtype:
        fmt = parse_expert_dtype(dtype)
        for text in grid.misses:
            spec = parse_misses(text)
            key = (fmt, spec.low)
            if key not in stores:
                stores[key] = ExpertStore.from_params(model.cfg, model.params, expert_dtype=fmt,
                                                      low_dtype=spec.low)
            s = stores[key]
            if key not in costs:
                probe = OffloadEngine(model.cfg, None, "on-demand", s.expert_bytes, store=s)
                costs[key] = (probe.miss_costs(), probe.calibrate_copy())
            rule = None if spec.plain else MissRule(spec, costs[key][0])
            for form in grid.slots:
                quantized = form == "quantized"
                if not quantized or (fmt is not None and spec.low is None):
                    out.append(Variant(s, spec.label, rule, costs[key][1], quantized))
    return out


def point_row(cfg, var: Variant, dense_bytes: int, eng, timing: dict, base: dict, trace,
              spec: PolicySpec, label: str, budget: int, ids, grid: OffloadBenchConfig) -> dict:
    """One result row: the point's timing, its cache counts, bytes moved, memory and bounds."""
    s, t, store, copy_s = eng.core.stats, eng.timings, var.store, var.copy_s
    batch, slots = ids.shape[0], eng.pool.num_slots
    copy_decode = t["decode_bytes"] / store.stored_bytes * copy_s
    transfer_bound = batch * t["decode_steps"] / copy_decode if copy_decode else float("inf")
    return {
        "model": cfg.name, "batch": batch, "prompt_len": int(ids.shape[1]),
        "new_tokens": grid.new_tokens, "budget": label, "budget_bytes": budget,
        "budget_fraction": budget / store.total_bytes, "policy": spec.label,
        "expert_dtype": var.fmt, "miss_option": var.misses,
        "quantized_slots": var.quantized, "slots": slots,
        **timing,
        "ratio_to_all_resident": timing["decode_tok_s"] / base["decode_tok_s"],
        "hit_rate": s.hit_rate, "reuse_rate": s.reuse_rate,
        # Belady from a cold pool bounds the cold-pool points; the preloaded all-resident
        # starts full, where the bound is every access
        "belady_hit_rate": 1.0 if preloaded(cfg, spec.policy) else
        belady_bound(stream_from_trace(trace), slots).hit_rate,
        "misses": s.misses, "prefetches": s.prefetches, "prefetch_used": s.prefetch_used,
        "prefetch_wasted": s.prefetch_wasted, "extra_rounds": s.extra_rounds,
        "served_low": s.served_low, "served_host": s.served_host, "upgrades": s.upgrades,
        "bytes_moved": eng.pool.bytes_loaded,
        "decode_bytes_moved": t["decode_bytes"],
        "decode_bytes_per_step": t["decode_bytes"] / max(1, t["decode_steps"]),
        "stored_expert_bytes": store.stored_bytes,
        "stall_s": eng.stats.stall_s,
        "hidden_fraction": hidden_fraction(eng.stats.stall_s, s.loads * copy_s),
        "peak_pool_bytes": eng.pool.pool_bytes,
        "device_param_bytes": dense_bytes + eng.pool.pool_bytes,
        "memory_kind": store.memory_kind,
        "bound_decode_tok_s": min(base["decode_tok_s"], transfer_bound),
        "copy_s_per_expert": copy_s,
    }


def jitted_md(rows: list[dict]) -> str:
    """The baseline: the whole-model jitted decode per batch size."""
    seen = {}
    for r in rows:
        seen.setdefault(r["batch"], r["jitted_decode_tok_s"])
    return "\n".join(["| B | jitted decode tok/s (the model without offloading) |", "|---|---|"]
                     + [f"| {b} | {v:.1f} |" for b, v in seen.items()])


def markdown_table(rows: list[dict]) -> str:
    head = ("| B | budget | policy | experts / misses | slots | decode tok/s (min-max) "
            "| x jitted | x all-res | recomputed | hit | reuse | Belady hit "
            "| prefetch used/wasted | low / host served | MB moved | decode MB / step | pool MB "
            "| bound tok/s |")
    lines = [head, "|" + "---|" * 18]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['budget']} | {r['policy']} | {r['expert_dtype']} / "
            f"{r['miss_option']}{' / quantized' if r['quantized_slots'] else ''} "
            f"| {r['slots']} "
            f"| {r['decode_tok_s']:.1f} ({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}) "
            f"| {r['ratio_to_jitted']:.2f} | {r['ratio_to_all_resident']:.2f} "
            f"| {r['recomputed']:g} | {r['hit_rate']:.2f} | {r['reuse_rate']:.2f} "
            f"| {r['belady_hit_rate']:.2f} | {r['prefetch_used']}/{r['prefetch_wasted']} "
            f"| {r['served_low']} / {r['served_host']} "
            f"| {r['bytes_moved'] / 1e6:.1f} | {r['decode_bytes_per_step'] / 1e6:.2f} "
            f"| {r['peak_pool_bytes'] / 1e6:.1f} "
            f"| {r['bound_decode_tok_s']:.1f} |")
    return "\n".join(lines)


def prompts_md(row: dict, grid: OffloadBenchConfig) -> str:
    """What the prompts were, for the report."""
    if row["domain"] == "vlm":
        return (f"Prompts: synthetic MMBench dev questions with their images ({grid.style} "
                f"style, in the model's tokenizer)")
    what = "random tokens" if row["domain"] == "random" else f"held-out stdlib {row['domain']}"
    return f"Prompts: {what}, up to {grid.prompt_len} tokens"


def bench(grid: OffloadBenchConfig) -> pathlib.Path:
    """Run the grid, write results.csv, results.json and report.md under grid.out, print the
    table; returns the output folder."""
    for spec in grid.policies:
        parse_policy(spec)
    for text in grid.expert_dtype:
        parse_expert_dtype(text)
    for text in grid.misses:
        parse_misses(text)
    for form in grid.slots:
        if form not in ("dequantized", "quantized"):
            raise ValueError(f"--slots {form!r}: expected dequantized or quantized")
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
                        f"# Expert offload: {rows[0]['model']}\n\n{prompts_md(rows[0], grid)}, "
                        f"{grid.new_tokens} new tokens, greedy; medians of "
                        f"{grid.repeats} cold-pool runs (all-resident: preloaded); ratios "
                        f"against the whole-model jitted decode (x jitted) and the engine's "
                        f"all-resident (x all-res), both measured in the same run; recomputed: "
                        f"layers run again per generate after reading an unresident expert; "
                        f"memory kind {rows[0]['memory_kind']}.\n\n{jitted_md(rows)}\n\n{table}")
    print(jitted_md(rows) + "\n\n" + table)
    print(f"\nwrote {out}/results.csv, results.json, report.md")
    return out
