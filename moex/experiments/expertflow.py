"""`moex bench expertflow`: ExpertFlow's comparison on its own kind of model -- a Switch
encoder-decoder -- with `predictive` against per-layer `lru` (Cache-MoE / mixtral-offloading)
and `pregated` at ExpertFlow's cache sizes (CS experts per MoE layer) and batch sizes.

    moex bench expertflow --checkpoint runs/lm/small-switch/model --predictor runs/rpp/switch

Per batch size B: held-out prompts (encoder inputs), the all-resident run (the baseline, the
oracle forecaster's trace) and a calibration run on other prompts (the prior's); per cache size
CS (a budget of CS x L_moe expert slots) and policy, `repeats` cold-pool greedy generates on the
live engine (moex.offload.seq2seq_engine): hit rate, decode tokens/s, its ratio to per-layer LRU
at the same point; then the GPU regime, which CPU timings do not show (a host-to-device copy
here is a memcpy): the live run's visit stream replayed by the simulator with the projected
model's expert bytes (`project`, bf16), the hardware's link for copies and a bandwidth-bound
compute per visit (the projected model's non-expert weights read once per decode step, spread
over its MoE layers, plus one expert read per token) -- decode tokens/s and the ratio to LRU.
Device memory at bf16 from shapes: the non-expert weights plus CS x L_moe slots, against all
experts resident, for Switch-base-32 / 64 / 128.

Writes results.csv / results.json / report.md (the table beside the paper's figures) and
hit_rate.png under `out`.
"""

from __future__ import annotations

import dataclasses
import pathlib

from moex.config import EncDecConfig, get_config
from moex.info import model_info
from moex.measure import md_table, write_outputs
from moex.offload.seq2seq_engine import reference_for
from moex.offload.simulator import ComputeModel, TransferModel, simulate_stream
from moex.offload.spec import parse_policy
from moex.offload.store import ExpertStore, expert_moe
from moex.perf.hardware import get_hardware
from moex.predict.forecast import make_forecaster
from moex.predict.lm import denoising_inputs

# ExpertFlow (arXiv 2410.17954v2) on one A40; REFERENCES.md
PAPER_HIT = {(16, 4): (91.90, 76.61), (16, 16): (85.91, 58.37), (8, 16): (71.89, 36.22)}
PAPER_SPEEDUP = "1.94-2.12x (Mixtral, Qwen1.5-MoE, DeepSeek-MoE; A40)"
PAPER_MEMORY = "Switch-128: 1.03 GB vs 15.26 GB all in GPU (93 % saved)"


@dataclasses.dataclass(frozen=True)
class ExpertFlowConfig:
    preset: str = "small-switch"
    checkpoint: str | None = None        # a Switch moex checkpoint (trained or converted)
    predictor: str | None = None         # a routing-path predictor folder: predictive:<it>
    domain: str = "prose"                # prompts: held-out stdlib prose / code, or random
    task: str = "denoise"                # denoise: the windows span-corrupted (what moex lm
                                         # train teaches a Switch model); plain: as they are
    batch_sizes: tuple[int, ...] = (4, 16)
    cache_sizes: tuple[int, ...] = (4, 8, 16)
    prompt_len: int = 64
    new_tokens: int = 16
    repeats: int = 3
    hardware: str = "a100-80g"           # the GPU regime's link and memory (moex perf hardware)
    project: str = "switch-base-32"      # the expert and weight bytes of the GPU regime
    seed: int = 0
    out: str = "results/expertflow"

    @property
    def policies(self) -> tuple[str, ...]:
        mine = (f"predictive:{self.predictor}",) if self.predictor else ()
        return ("lru", "pregated", *mine, "predictive:oracle", "predictive:prior")


def gpu_models(project: EncDecConfig, hw) -> tuple[TransferModel, ComputeModel, int]:
    """(link, compute per visit, expert bytes) of the projected model at bf16 on `hw`."""
    info = model_info(project)
    moe = expert_moe(project)
    expert_bytes = 2 * 2 * project.d_model * moe.expert_dim          # wi + wo, bf16
    dense_bytes = 2 * (info.total_params - info.routed_expert_params)
    layers = len(project.moe_layers()) // 2                          # per stack: one pass
    compute = ComputeModel(seconds_per_layer=dense_bytes / hw.memory_bandwidth / layers,
                           seconds_per_token=expert_bytes / hw.memory_bandwidth)
    return TransferModel(hw.link_bandwidth, hw.link_latency), compute, expert_bytes


def memory_rows(cache_sizes) -> list[list[str]]:
    """Device bytes at bf16 of Switch-base-E with CS experts per MoE layer resident."""
    rows = []
    for e in (32, 64, 128):
        cfg = get_config(f"switch-base-{e}")
        info = model_info(cfg)
        dense = 2 * (info.total_params - info.routed_expert_params)
        experts = 2 * info.routed_expert_params
        per_expert = experts / (e * len(cfg.moe_layers()))
        for cs in cache_sizes:
            pool = cs * len(cfg.moe_layers()) * per_expert
            rows.append([cfg.name, str(cs), f"{(dense + experts) / 1e9:.2f}",
                         f"{(dense + pool) / 1e9:.2f}",
                         f"{100 * (1 - (dense + pool) / (dense + experts)):.1f}"])
    return rows


def run(grid: ExpertFlowConfig, progress: bool = True) -> list[dict]:
    from tqdm import tqdm
    from moex.experiments.offload_grid import model_of, run_point
    bench = _grid_view(grid)
    model = model_of(bench)
    cfg = model.cfg
    if not isinstance(cfg, EncDecConfig):
        raise ValueError(f"{cfg.name} is not an encoder-decoder; `moex bench offload` runs "
                         "decoder models")
    store = ExpertStore.from_params(cfg, model.params)
    layers = store.layers
    transfer, compute, proj_bytes = gpu_models(get_config(grid.project),
                                               get_hardware(grid.hardware))
    specs = [parse_policy(p) for p in grid.policies]
    rows = []
    bar = tqdm(total=len(grid.batch_sizes) * len(grid.cache_sizes) * len(specs),
               disable=not progress, desc="expertflow")
    for batch in grid.batch_sizes:
        ids, mask, _ = encoder_prompts(model, grid, batch, grid.seed + batch)
        base, ref = run_point(cfg, store, "all-resident", None, store.total_bytes, ids, mask,
                              None, bench, True)
        trace = ref.trace()
        other = encoder_prompts(model, grid, batch, grid.seed + 1000 + batch)
        calibration = reference_for(cfg, store, *other, new_tokens=grid.new_tokens).trace()
        for cs in grid.cache_sizes:
            slots = min(cs, store.num_experts) * len(layers)
            warm = False
            for spec in specs:
                bar.set_postfix_str(f"B={batch} CS={cs} {spec.label}")
                forecaster = make_forecaster(spec, trace, calibration)
                timing, eng = run_point(cfg, store, spec.policy, forecaster,
                                        slots * store.expert_bytes, ids, mask, None, bench,
                                        warmup=not warm)
                warm = True
                sim = simulate_stream(eng.stream, spec.policy, slots, layers, store.num_experts,
                                      expert_bytes=proj_bytes, transfer=transfer,
                                      compute=compute)
                decoded = batch * grid.new_tokens
                rows.append({"model": cfg.name, "batch": batch, "cache_size": cs,
                             "slots": slots, "policy": spec.label,
                             "hit_rate": eng.core.stats.hit_rate,
                             "misses": eng.core.stats.misses,
                             "prefetches": eng.core.stats.prefetches,
                             "prefetch_wasted": eng.core.stats.prefetch_wasted,
                             **timing, "all_resident_decode_tok_s": base["decode_tok_s"],
                             "gpu_decode_tok_s": decoded / sim.seconds_after(0),
                             "gpu_hit_rate": sim.hit_rate})
                bar.update()
    bar.close()
    for r in rows:                        # ratios to per-layer LRU at the same point
        lru = next(x for x in rows if (x["batch"], x["cache_size"], x["policy"]) ==
                   (r["batch"], r["cache_size"], "lru"))
        r["x_lru_cpu"] = r["decode_tok_s"] / lru["decode_tok_s"]
        r["x_lru_gpu"] = r["gpu_decode_tok_s"] / lru["gpu_decode_tok_s"]
    return rows


def encoder_prompts(model, grid: ExpertFlowConfig, batch: int, seed: int):
    """(ids, mask, None): `batch` held-out encoder inputs of the grid's domain and task."""
    from moex.experiments.offload_grid import prompts
    if grid.task == "plain" or grid.domain == "random":
        return prompts(model, batch, grid.prompt_len, seed, grid.domain)
    if grid.task != "denoise":
        raise ValueError(f"task {grid.task!r}: expected denoise or plain")
    return (*denoising_inputs(model.cfg, grid.domain, "heldout", batch, grid.prompt_len, seed),
            None)


def _grid_view(grid: ExpertFlowConfig):
    """The offload grid's config for the shared pieces (model, prompts, timed runs)."""
    from moex.experiments.offload_grid import OffloadBenchConfig
    return OffloadBenchConfig(preset=grid.preset, checkpoint=grid.checkpoint,
                              prompt_len=grid.prompt_len, new_tokens=grid.new_tokens,
                              repeats=grid.repeats, seed=grid.seed, domain=grid.domain)


def report(rows: list[dict], grid: ExpertFlowConfig) -> str:
    main = md_table(
        ["B", "CS", "policy", "hit %", "misses", "prefetch (wasted)", "CPU decode tok/s",
         "x LRU (CPU)", f"GPU-regime tok/s ({grid.hardware})", "x LRU (GPU regime)"],
        [[str(r["batch"]), str(r["cache_size"]), r["policy"], f"{100 * r['hit_rate']:.1f}",
          str(r["misses"]), f"{r['prefetches']} ({r['prefetch_wasted']})",
          f"{r['decode_tok_s']:.1f}", f"{r['x_lru_cpu']:.2f}", f"{r['gpu_decode_tok_s']:.0f}",
          f"{r['x_lru_gpu']:.2f}"] for r in rows])
    best = parse_policy(grid.policies[2]).label if grid.predictor else "predictive:oracle"
    side = []
    for (cs, b), (paper_pred, paper_lru) in PAPER_HIT.items():
        got = {r["policy"]: r for r in rows if (r["cache_size"], r["batch"]) == (cs, b)}
        if "lru" in got and best in got:
            side.append([f"hit rate, CS={cs}, BS={b}", f"{paper_pred:.1f} % vs {paper_lru:.1f} %",
                         f"{100 * got[best]['hit_rate']:.1f} % vs "
                         f"{100 * got['lru']['hit_rate']:.1f} %"])
    pred = [r for r in rows if r["policy"] == best]
    if pred:
        side.append(["speedup over per-layer LRU", PAPER_SPEEDUP,
                     f"GPU regime {min(r['x_lru_gpu'] for r in pred):.2f}-"
                     f"{max(r['x_lru_gpu'] for r in pred):.2f}x; CPU live "
                     f"{min(r['x_lru_cpu'] for r in pred):.2f}-"
                     f"{max(r['x_lru_cpu'] for r in pred):.2f}x"])
    mem = memory_rows(grid.cache_sizes)
    m128 = next(r for r in mem if r[0] == "switch-base-128" and r[1] == str(min(grid.cache_sizes)))
    side.append(["memory saved", PAPER_MEMORY, f"switch-base-128, CS={m128[1]}: {m128[3]} GB vs "
                 f"{m128[2]} GB ({m128[4]} % saved; weights only, bf16)"])
    return "\n\n".join([
        f"# ExpertFlow comparison: {rows[0]['model']}",
        f"`{best}` (ExpertFlow's predictive policy) against per-layer LRU and pre-gating; "
        f"prompts: held-out {grid.domain} ({grid.prompt_len} bytes, {grid.task}), "
        f"{grid.new_tokens} new "
        f"tokens, greedy; CPU medians of {grid.repeats} cold-pool runs; GPU regime: the live "
        f"visit stream replayed with {grid.project}'s bf16 expert bytes on {grid.hardware}'s "
        "link (see moex/experiments/expertflow.py).",
        "## Beside the paper", md_table(["figure", "ExpertFlow (paper)", "moex"], side),
        "## Every point", main,
        "## Device memory at bf16 (from shapes)",
        md_table(["model", "CS", "all experts GB", "with CS slots / layer GB", "saved %"], mem)])


def plot(rows: list[dict], folder: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["cache_size"], 100 * r["hit_rate"]) for r in rows
                         if r["batch"] == b and r["policy"] == policy)
            ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set(title=f"B = {b}", xlabel="cache size (experts per MoE layer)", ylabel="hit %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "hit_rate.png", dpi=120)
    plt.close(fig)


def bench(grid: ExpertFlowConfig) -> pathlib.Path:
    for p in grid.policies:
        parse_policy(p)
    rows = run(grid)
    text = report(rows, grid)
    out = write_outputs(grid.out, rows, {**dataclasses.asdict(grid), "policies": grid.policies},
                        text, lambda tmp: plot(rows, tmp))
    print(text)
    print(f"\nwrote {out}/results.csv, results.json, report.md, hit_rate.png")
    return out
