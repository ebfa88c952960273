"""The research question end to end: dense vs hard-MoE vs soft-MoE VLMs across batch sizes and
sequence lengths -- throughput, memory, accuracy, routing, and expert offloading.

    python experiments/vlm_efficiency.py                 # mini (trained) + small (grid), CPU grid
    python experiments/vlm_efficiency.py --grid full     # batch 1..32 x seq 256..2048

Pipeline (each step cached, so a rerun only measures):
  1. data: the synthetic MMBench / SEED-Bench splits (`moex.data.synthetic`), or the given files;
  2. models: the `family` presets trained by the default recipe (`moex.train_vlm.train_family`:
     dense from scratch on fresh synthetic questions, then sparsely upcycled to hard and soft and
     fine-tuned; orbax checkpoints under runs/vlm), or the given moex checkpoints (converted
     LLaVA, ...);
  3. accuracy of each model on the benchmark split: MMBench CircularEval and plain accuracy,
     SEED-Bench likelihood ranking and generated answer (`moex.eval`), per category, and the
     learning curves of the trained models;
  4. routing of the hard-MoE models on the benchmark prompts: expert load per block and the
     routing signature of each question category (`moex.eval.routing`);
  5. throughput and memory over batch x sequence length of the `grid_family` presets (random
     weights: speed and memory do not depend on them; the trained family when it is the same):
     prefill tokens/s, decode tokens/s, multiple-choice questions/s = B / prefill time (the answer
     is read from the prefill's last logits), parameter bytes (experts / rest), KV-cache bytes,
     XLA's compiled prefill peak or the allocator's peak where the backend reports one; warm-up,
     >= 5 repeats, medians with min / max;
  6. expert offloading for the trained hard-MoE models: the live engine (`moex.offload.engine`)
     on benchmark prompts (their routing is the trained model's) under each policy and budget.

Output under --out: results.csv / results.json (one row per (model, batch, seq_len, policy,
budget); `policy` "resident-jit" = the whole jitted model, every expert resident),
accuracy.json, routing.json, report.md with the tables, and PNG plots: throughput vs batch size
per sequence length, memory vs batch size, throughput vs device-memory budget, learning curves.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from tqdm import tqdm

from moex import checkpoint
from moex.checkpoint import load_model
from moex.data import SyntheticSpec, read_mmbench, read_seedbench, write_synthetic
from moex.data.vocab import tokenizer_for
from moex.eval import ScoreConfig, Scorer, chance, evaluate_mmbench, evaluate_seed
from moex.eval.routing import load_rows, markdown, routing_usage, signature_rows
from moex.experiments import precision_projection, projection
from moex.experiments.efficiency_report import (RESIDENT_JIT, accuracy_md, relative_md, report_md,
                                                throughput_md, write_plots)
from moex.experiments.offload_grid import cold_runs, jitted_decode
from moex.experiments.projection import ProjectConfig
from moex.experiments.throughput import CompareConfig, run_point
from moex.generate import Generator
from moex.measure import tree_bytes, write_outputs
from moex.model import build, shard_params
from moex.nn import sharding
from moex.nn.sharding import format_mesh
from moex.nn.decoder import init_cache
from moex.offload.forecast import reference_run
from moex.offload.spec import budget_slots, parse_budget, parse_policy
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace
from moex.predict.forecast import make_forecaster, make_lookahead
from moex.predict.vlm import trace_benchmark, vlm_prompts
from moex.train_vlm import Recipe, train_family

GRIDS = {   # (batch sizes, sequence lengths incl. image tokens, max B x T per point)
    "cpu": ((1, 4, 16), (256, 1024, 2048), 8192),
    "full": ((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), 1 << 30),
    "tiny": ((1, 2), (64,), 1 << 30),
}


@dataclasses.dataclass(frozen=True)
class EfficiencyConfig:
    family: str = "mini"                        # presets {family}-dense / -hard / -soft: accuracy,
                                                # routing, offloading
    grid_family: str = "small"                  # presets of the throughput / memory grid ("" or
                                                # the family: the family's own models)
    checkpoints: tuple[str, ...] = ()           # moex checkpoints instead of both families
    train: bool = True                          # train the family (the recipe; cached) first
    train_steps: int = 900                      # dense steps of the recipe
    finetune_steps: int = 100                   # upcycled hard / soft fine-tuning steps
    grid: str = "auto"                          # GRIDS key; auto: cpu on CPU, else full
    batch_sizes: tuple[int, ...] = ()           # override the grid's
    seq_lens: tuple[int, ...] = ()
    max_tokens: int = 0                         # override the grid's cap on B x T (0: grid's)
    decode_steps: int = 8
    warmup: int = 1
    repeats: int = 5
    policies: tuple[str, ...] = ("lru", "pregated")
    budgets: tuple[str, ...] = ("50%", "25%")
    offload_batches: tuple[int, ...] = (1, 4)
    offload_new_tokens: int = 8                 # decode steps timed per offload run
    offload_repeats: int = 3
    mmbench: str | None = None                  # MMBench TSV (default: synthetic dev split)
    seed_json: str | None = None                # SEED-Bench JSON + image folder (default: synthetic)
    seed_images: str | None = None
    tokenizer: str | None = None                # tokenizer.json for converted checkpoints
    template: str = "{prompt}"                  # chat template, e.g. "USER: {prompt} ASSISTANT:"
    style: str = "compact"                      # prompt style (moex.data.prompts.STYLES)
    image_mode: str = "crop"                    # "crop" (CLIP) or "pad" (LLaVA-1.5)
    eval_questions: int = 200                   # per benchmark (0: all)
    eval_batch: int = 50
    routing_questions: int = 400                # dev questions whose routing is counted
    data: str = "runs/data/synthetic"
    runs: str = "runs/vlm"
    seed: int = 0
    out: str = "results/vlm_efficiency"
    project: tuple[str, ...] = ()               # hardware specs (moex.perf): the PROJECTED 7B
                                                # tables instead of the measured study
    project_trace: str = ""                     # routing trace for the offload projection
                                                # (default: the trained {family}-hard's)
    mesh: str | None = None                     # the grid sharded over a mesh, e.g.
                                                # "data=2,expert=4" (moex.nn.sharding); the
                                                # offload engine stays on one device

    def grid_points(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        name = self.grid if self.grid != "auto" else ("cpu" if jax.default_backend() == "cpu"
                                                      else "full")
        if name not in GRIDS:
            raise ValueError(f"unknown grid {name!r}; expected one of {sorted(GRIDS)} or auto")
        b, s, cap = GRIDS[name]
        return self.batch_sizes or b, self.seq_lens or s, self.max_tokens or cap


# -- models and data ------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
    """One model of the study: where it comes from decides what it is measured for."""

    name: str
    cfg: object
    params: object
    tokenizer: object
    source: str                      # "trained", "random weights", or a checkpoint path
    log: list = dataclasses.field(default_factory=list)   # training log (learning curve)


def recipe(study: EfficiencyConfig):
    return Recipe(dense_steps=study.train_steps, finetune_steps=study.finetune_steps, seed=study.seed,
                  data=study.data, out=study.runs)


def models(study: EfficiencyConfig, progress: bool = True) -> list[Model]:
    """The models whose accuracy, routing and offloading are measured: the given checkpoints
    (with their tokenizer.json, or --tokenizer), or the family trained by the recipe (cached),
    or with --no-train the family's random weights."""
    if study.checkpoints:
        return [_model(load_model(path, tokenizer=study.tokenizer), str(path))
                for path in study.checkpoints]
    if not study.train:
        return random_models(study.family, study.seed)
    return [Model(cfg.name, cfg, params, tokenizer_for(cfg, model_dir), "trained",
                  training_log(model_dir))
            for cfg, params, model_dir in train_family(study.family, recipe(study), progress)]


def training_log(model_dir) -> list[dict]:
    """A trained model's log; an upcycled model's steps continue from its dense start's last
    step, so the family's learning curves share one axis of total training steps."""
    meta = checkpoint.metadata(model_dir)
    log, init = meta.get("log", []), meta.get("config", {}).get("init")
    if not init:
        return log
    start = (checkpoint.metadata(init).get("log") or [{"step": 0}])[-1]["step"]
    return [{**e, "step": e["step"] + start, "finetune_step": e["step"]} for e in log]


def random_models(family: str, seed: int) -> list[Model]:
    return [_model(load_model(f"{family}-{kind}", seed), "random weights")
            for kind in ("dense", "hard", "soft")]


def _model(loaded, source: str) -> Model:
    return Model(loaded.cfg.name, loaded.cfg, loaded.params, loaded.tokenizer, source)


def grid_models(study: EfficiencyConfig, studied: list[Model]) -> list[Model]:
    """The models of the throughput / memory grid: the studied ones when they are the grid's
    (checkpoints, or grid_family == family), else the grid family's random weights (throughput
    and memory depend on shapes, not on weights)."""
    if study.checkpoints or study.grid_family in ("", study.family):
        return studied
    return random_models(study.grid_family, study.seed)


def benchmark_questions(study: EfficiencyConfig):
    """(MMBench questions, SEED questions, description): the given files or the synthetic dev
    splits, the first `eval_questions` of each."""
    paths = None
    if study.mmbench is None or study.seed_json is None:
        paths = write_synthetic(study.data, SyntheticSpec(seed=study.seed))
    mm_file = study.mmbench or paths["mmbench/dev"]
    seed_file = study.seed_json or paths["seed/dev"]
    seed_images = study.seed_images or (paths["seed/images"] if paths else None)
    if seed_images is None:
        raise ValueError("--seed-json needs --seed-images (the SEED-Bench image folder)")
    mm, seed = read_mmbench(mm_file), read_seedbench(seed_file, seed_images)
    n = study.eval_questions or None
    return mm[:n], seed[:n], {"mmbench": str(mm_file), "seed": str(seed_file)}


def scorer(study: EfficiencyConfig, m: Model):
    return Scorer(m.cfg, m.params, m.tokenizer,
                  ScoreConfig(style=study.style, template=study.template, batch_size=study.eval_batch,
                              mode=study.image_mode, max_new_tokens=12))


def accuracy(study: EfficiencyConfig, m: Model, mm, seed) -> dict:
    s = scorer(study, m)
    got = evaluate_mmbench(s, mm)
    sd = evaluate_seed(s, seed)
    tables = {**got["tables"], **sd["tables"]}
    keep = lambda k: k in ("step", "finetune_step") or k.startswith("dev_")
    curve = [{k: v for k, v in e.items() if keep(k)}
             for e in m.log if any(k.startswith("dev_") for k in e)]
    return {"model": m.name, "source": m.source, "tables": tables,
            "questions_per_s": {**got["questions_per_s"], **sd["questions_per_s"]},
            "chance": {"mmbench_circular": chance(mm, circular=True),
                       "mmbench_plain": chance(mm), "seed": chance(seed)},
            "learning_curve": curve}


def routing(study: EfficiencyConfig, m: Model, questions) -> dict | None:
    """Expert load and per-category routing signatures of a hard-MoE model (None otherwise)."""
    if m.cfg.decoder.moe.kind != "hard" and (m.cfg.vision is None
                                             or m.cfg.vision.moe.kind != "hard"):
        return None
    usage = routing_usage(m.cfg, m.params, m.tokenizer, questions, batch_size=study.eval_batch,
                          style=study.style, mode=study.image_mode, template=study.template)
    return {"model": m.name, "source": m.source, "questions": len(questions),
            "load": load_rows(usage), "signatures": signature_rows(usage),
            "markdown": markdown(usage)}


# -- throughput and memory -----------------------------------------------------------------------

def resident_row(gen, params, cfg, batch: int, seq_len: int, study: EfficiencyConfig) -> dict:
    """The whole jitted model at one grid point: `moex compare`'s measurement, in study rows."""
    resident = CompareConfig(decode_steps=study.decode_steps, warmup=study.warmup,
                             repeats=study.repeats, seed=study.seed)
    r = run_point(gen, params, cfg, batch, seq_len, resident)
    device_peak = r.pop("device_peak_bytes")
    timing = {k: r[k] for k in TIMING_KEYS}
    timing["mc_questions_per_s"] = batch / r["prefill_s_median"]
    return {**_keys(cfg, batch, seq_len, RESIDENT_JIT, "100%"), **timing,
            **_memory_cells(r["param_bytes_experts"], r["param_bytes_rest"], r["kv_cache_bytes"],
                            device_peak if device_peak > 0 else r["prefill_peak_bytes"],
                            "allocator" if device_peak > 0 else "xla-prefill"),
            **_offload_cells(1.0, 0, 0.0),
            # the jitted model is its own baseline (offload rows: the jitted decode on their
            # prompts, and their rate over it)
            "jitted_decode_tokens_per_s": timing["decode_tokens_per_s"], "decode_x_jitted": 1.0,
            "recomputed_layers": 0}


def grid_rows(gridded: list[Model], points, study: EfficiencyConfig, bar=None) -> list[dict]:
    """The throughput / memory grid: every model at every (B, T) point, whole-model jitted, on
    one device or sharded over `study.mesh` (params placed by their logical names)."""
    plan = sharding.plan_for(study.mesh)
    rows = []
    for m in gridded:
        gen, params = Generator(build(m.cfg), plan), shard_params(m.cfg, m.params, plan)
        for b, s in points:
            if bar is not None:
                bar.set_postfix_str(f"{m.name} B={b} T={s}")
            rows.append({**resident_row(gen, params, m.cfg, b, s, study), "weights": m.source,
                         "mesh": "1 device" if plan is None else format_mesh(plan.shape)})
            if bar is not None:
                bar.update()
    return rows


TIMING_KEYS = ("prefill_tokens_per_s", "prefill_s_median", "prefill_s_min", "prefill_s_max",
               "decode_tokens_per_s", "decode_step_s_median", "decode_step_s_min",
               "decode_step_s_max")


def _memory_cells(experts: int, rest: int, kv: int, peak: int, source: str) -> dict:
    return {"param_bytes_experts": experts, "param_bytes_rest": rest,
            "device_param_bytes": experts + rest, "kv_cache_bytes": kv,
            "peak_device_bytes": peak, "peak_source": source}


def _offload_cells(hit_rate: float, bytes_moved: int, stall_fraction: float) -> dict:
    return {"hit_rate": hit_rate, "bytes_moved": bytes_moved, "stall_fraction": stall_fraction}


def _keys(cfg, batch, seq_len, policy, budget) -> dict:
    kind = cfg.decoder.moe.kind
    return {"model": cfg.name, "kind": kind, "batch": batch, "seq_len": seq_len,
            "policy": policy, "budget": budget}


def offload_rows(m: Model, study: EfficiencyConfig, questions, progress_bar=None) -> list[dict]:
    """The live offload engine on the benchmark's first B questions (their prompts and images,
    in the model's tokenizer: the routing is the model's own on its task) x (all-resident,
    policies x budgets): prefill and decode tokens/s (medians of cold-pool repeats), hit rate,
    bytes moved, device bytes. predictive:oracle forecasts from the all-resident run's trace,
    predictive:prior from an all-resident run on the next B questions. Every row also holds
    the whole-model jitted decode on the same prompts and its decode rate as a ratio to it
    (`decode_x_jitted`: the model without offloading is the baseline; the engine's
    all-resident, preloaded, is its own row)."""
    cfg = m.cfg
    store = ExpertStore.from_params(cfg, m.params)
    rest = tree_bytes(store.dense_params)
    points = [(parse_policy("all-resident"), "100%")] + [
        (parse_policy(p), b) for b in study.budgets for p in study.policies]
    rows = []
    for batch in study.offload_batches:
        prompts = _offload_prompts(m, study, questions[:batch])
        seq = prompts[0].shape[1]
        kv = tree_bytes(jax.eval_shape(lambda: init_cache(   # shapes only, as in resident rows
            cfg.decoder, batch, seq + study.offload_new_tokens, np.dtype(cfg.dtype)))["layers"])
        warm, forecasters, reference = set(), {}, None
        jit = jitted_decode(cfg, m.params, prompts, study.offload_new_tokens,
                            study.offload_repeats)["decode_tok_s"]
        for spec, label in points:
            if progress_bar is not None:
                progress_bar.set_postfix_str(f"{cfg.name} offload B={batch} {spec.label} {label}")
            if spec not in forecasters:          # after all-resident, whose trace is the oracle's
                calibration = None
                if spec.forecast == "prior":
                    calibration = reference_run(cfg, store, *_offload_prompts(
                        m, study, questions[batch:2 * batch] or questions[:batch]),
                        new_tokens=study.offload_new_tokens).trace()
                forecasters[spec] = make_forecaster(spec, reference, calibration)
            budget = parse_budget(label, store.total_bytes)
            slots = budget_slots(budget, store.expert_bytes)
            runs, eng = cold_runs(cfg, store, spec.policy, forecasters[spec], budget, prompts,
                                  study.offload_new_tokens, study.offload_repeats,
                                  warmup=slots not in warm, lookahead=make_lookahead(spec))
            warm.add(slots)
            if spec.policy == "all-resident":
                reference = eng.trace()
            pool = eng.pool.pool_bytes
            med = lambda key: statistics.median(key(t) for t in runs)
            timing = _timing_cells(batch * seq, batch, [t["prefill_s"] for t in runs],
                                   [t["decode_s"] / max(1, t["decode_steps"]) for t in runs])
            rows.append({**_keys(cfg, batch, seq, spec.label, label), **timing,
                         "jitted_decode_tokens_per_s": jit,
                         "decode_x_jitted": timing["decode_tokens_per_s"] / jit,
                         "recomputed_layers": med(lambda t: t["recomputed"]),
                         **_memory_cells(pool, rest, kv, rest + pool + kv, "accounted"),
                         **_offload_cells(med(lambda t: t["hit_rate"]),
                                          int(med(lambda t: t["bytes_moved"])),
                                          med(lambda t: t["decode_stall_s"] / t["decode_s"]
                                              if t["decode_s"] else 0.0))})
    return rows


def _offload_prompts(m: Model, study: EfficiencyConfig, questions):
    ids, mask, images = vlm_prompts(m.cfg, m.tokenizer, questions, study.style, study.image_mode,
                                    study.template)
    return ids, mask, jnp.asarray(images)


def _timing_cells(prefill_tokens: int, batch: int, prefill_s: list, step_s: list) -> dict:
    """The timing columns of a row from per-run prefill seconds and per-step decode seconds."""
    pre, dec = statistics.median(prefill_s), statistics.median(step_s)
    return {"prefill_tokens_per_s": prefill_tokens / pre, "prefill_s_median": pre,
            "prefill_s_min": min(prefill_s), "prefill_s_max": max(prefill_s),
            "decode_tokens_per_s": batch / dec, "decode_step_s_median": dec,
            "decode_step_s_min": min(step_s), "decode_step_s_max": max(step_s),
            "mc_questions_per_s": batch / pre}


def run(study: EfficiencyConfig, progress: bool = True):
    """(rows, accuracy per model, routing per hard-MoE model, grid points skipped, the
    benchmark files used, which models each part measured)."""
    for policy in study.policies:
        parse_policy(policy)                      # a bad policy fails before any training
    sharding.plan_for(study.mesh)                 # and so does a mesh this machine lacks
    batch_sizes, seq_lens, cap = study.grid_points()
    studied = models(study, progress)
    gridded = grid_models(study, studied)
    mm, seed, data = benchmark_questions(study)
    routing_q = benchmark_questions(dataclasses.replace(study, eval_questions=study.routing_questions))[0]
    points = [(b, s) for s in seq_lens for b in batch_sizes if b * s <= cap]
    skipped = [f"B={b} T={s} (B x T > {cap})" for s in seq_lens for b in batch_sizes
               if b * s > cap]
    hard = [m for m in studied if m.cfg.decoder.moe.kind == "hard"]
    n_off = len(hard) * len(study.offload_batches) * (1 + len(study.policies) * len(study.budgets))
    bar = tqdm(total=len(studied) + len(gridded) * len(points) + n_off + len(hard),
               desc="vlm_efficiency", disable=not progress)
    rows, acc, routes = [], [], []
    for m in studied:
        bar.set_postfix_str(f"{m.name} accuracy")
        acc.append(accuracy(study, m, mm, seed))
        bar.update()
        if m in hard:
            bar.set_postfix_str(f"{m.name} routing")
            routes.append(routing(study, m, routing_q))
            bar.update()
    rows += grid_rows(gridded, points, study, bar)
    if study.policies:
        for m in hard:
            before = len(rows)
            rows += [{**r, "weights": m.source, "mesh": "1 device"}   # the engine: one device
                     for r in offload_rows(m, study, mm, bar)]
            bar.update(len(rows) - before)
    bar.close()
    scores = {a["model"]: a for a in acc}
    for r in rows:
        t = scores[r["model"]]["tables"] if r["model"] in scores else {}
        for k in acc[0]["tables"]:
            r[f"acc_{k}"] = t[k]["overall"] if k in t else float("nan")
    roles = {"accuracy": [m.name for m in studied], "routing": [m.name for m in hard],
             "grid": [m.name for m in gridded], "offload": [m.name for m in hard] if study.policies
             else [], "sources": {m.name: m.source for m in studied + gridded}}
    return rows, acc, routes, skipped, data, roles


# -- outputs and command line ---------------------------------------------------------------------

def write_results(rows, acc, routes, skipped, study: EfficiencyConfig, data: dict,
                  roles: dict) -> pathlib.Path:

    def extra(tmp: pathlib.Path):
        (tmp / "accuracy.json").write_text(json.dumps(acc, indent=2))
        (tmp / "routing.json").write_text(json.dumps(routes, indent=2))
        write_plots(rows, acc, tmp, routes)
    return write_outputs(study.out, rows, {**dataclasses.asdict(study), "skipped": skipped,
                                        "data": data, "models": roles},
                         report_md(rows, acc, routes, skipped, study, data, roles), extra)


def project_trace(study: EfficiencyConfig, progress: bool = True) -> Trace:
    """The routing trace the offload projection maps onto the large models: --project-trace,
    or the trained {family}-hard model's answers to the synthetic dev questions (trained by the
    recipe when missing; the trace is cached under runs/traces)."""
    if study.project_trace:
        return Trace.load(study.project_trace)
    path = pathlib.Path(study.runs).parent / "traces" / f"{study.family}-hard-vlm-project.npz"
    if path.exists():
        return Trace.load(path)
    hard = [d for cfg, _, d in train_family(study.family, recipe(study), progress)
            if cfg.decoder.moe.kind == "hard"]
    if not hard:
        raise ValueError(f"the {study.family} family has no hard-MoE decoder to trace: give "
                         f"--project-trace")
    trace, _ = trace_benchmark(hard[0], questions=256, new_tokens=8, data=study.data,
                               seed=study.seed)
    trace.save(path)
    return trace


def project(study: EfficiencyConfig) -> int:
    """--project: the 7B tables and offload projections on each named hardware spec."""
    p = ProjectConfig(hardware=study.project, offload_hardware=study.project,
                      out=f"{study.out}-projected")
    grid = [r for hw in p.hardware for r in projection.grid_rows(p, hw)]
    trace = project_trace(study)
    offload = projection.offload_rows(p, trace)
    precision = precision_projection.rows_for(         # a smaller grid than moex perf precision
        precision_projection.PrecisionConfig(hardware=study.project, budgets=("25%",),
                                             policies=("lru", "lfu", "pregated")), trace)
    out = projection.write(p, grid, offload,
                           notes=f"Routing trace: {trace.model} ({len(trace)} tokens), mapped "
                                 f"onto each model's experts (moex.perf.offload.map_trace).",
                           more=precision, more_md=precision_projection.section(precision))
    print(projection.grid_md(grid), projection.offload_md(offload),
          precision_projection.findings(precision), sep="\n\n")
    print(f"\nwrote {out}/results.csv, results.json, report.md and projected_*.png "
          f"(every figure PROJECTED by moex.perf, not measured)")
    return 0


def main(study: EfficiencyConfig) -> int:
    """The whole study: run, write the results under study.out, print the headline tables."""
    if study.project:
        return project(study)
    rows, acc, routes, skipped, data, roles = run(study)
    out = write_results(rows, acc, routes, skipped, study, data, roles)
    print(accuracy_md(acc).split("\n\n")[0], throughput_md(rows), relative_md(rows), sep="\n\n")
    print(f"\nwrote {out}/results.csv, results.json, accuracy.json, routing.json, report.md "
          "and the PNG plots")
    return 0
