"""The 7B answer, projected: dense vs hard vs soft VLMs and expert offloading on real hardware,
from the calibrated performance model (moex.perf). Every number here is a projection.

    python experiments/vlm_efficiency.py --project h200          # = moex efficiency --project
    moex perf offload --hardware h200 rtx4090                    # the offload projection alone

1. Throughput and memory (`grid_rows`): the 7B-class dense, hard and soft VLM presets over
   B 1-64 x T 512-8192 (image tokens included): prefill tokens/s (and multiple-choice
   questions/s = B / prefill time), decode tokens/s at context T, device memory (weights, KV
   cache, the largest transient), whether it fits, and the bound that holds.
2. Offloading (`offload_rows`): for each model, hardware, decode batch, policy and expert
   budget, the replay simulator on the generated tokens of a routing trace recorded on a
   trained moex model and mapped onto the model's expert shape (moex.perf.offload.map_trace),
   `batch` tokens per decode step, with compute and copy times from the model: projected
   decode tokens/s beside all-resident (every expert in device memory: the compute bound, no
   copies), Belady's offline-optimal loads, and the transfer bound (tokens / copy time). The
   replay starts from an empty pool (the first loads of each expert count; over the ~2000
   generated tokens of the default trace they are a few percent of the time).
"""

from __future__ import annotations

import dataclasses
import pathlib

from tqdm import tqdm

from moex.config import get_config
from moex.measure import write_outputs
from moex.offload.simulator import simulate
from moex.offload.spec import budget_slots, parse_budget, parse_policy
from moex.offload.trace import Trace
from moex.perf.hardware import get_hardware
from moex.perf.model import cached_info, memory_bytes, predict
from moex.perf.offload import decode_only, expert_bytes, expert_layers, sim_models, trace_for
from moex.predict.forecast import make_forecaster

KINDS = ("dense", "hard", "soft")
LABEL = "projected"


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    hardware: tuple[str, ...] = ("h200",)
    presets: tuple[str, ...] = ("llava-1.5-7b", "llava-1.5-7b-hard", "llava-1.5-7b-soft")
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    offload_presets: tuple[str, ...] = ("llava-1.5-7b-hard", "llava-1.5-7b-soft",
                                        "mixtral-8x7b", "qwen3-vl-30b-a3b")
    offload_hardware: tuple[str, ...] = ("h200", "rtx4090")
    policies: tuple[str, ...] = ("on-demand", "lru", "lfu", "pregated", "predictive:prior",
                                 "belady")
    budgets: tuple[str, ...] = ("50%", "25%")
    offload_batches: tuple[int, ...] = (1, 8)
    context: int = 2048                    # KV entries during the projected decode
    trace: str = ""                        # routing trace (.npz) of a trained hard-MoE model
    out: str = "results/projection"


# -- 1. throughput and memory -------------------------------------------------------------------

def kind_of(cfg) -> str:
    """dense, hard or soft: the decoder's MoE kind, else the vision tower's."""
    kinds = (cfg.decoder.moe.kind, cfg.vision.moe.kind if cfg.vision else "dense")
    return next((k for k in kinds if k != "dense"), "dense")


def grid_rows(p: ProjectConfig, hardware: str) -> list[dict]:
    hw = get_hardware(hardware)
    rows = []
    for name in p.presets:
        cfg = get_config(name)
        info = cached_info(cfg)
        for b in p.batch_sizes:
            for t in p.seq_lens:
                pre = predict(cfg, hw, "prefill", b, t)
                dec = predict(cfg, hw, "decode", b, t)
                mem = memory_bytes(cfg, b, t)
                rows.append(dict(
                    source=LABEL, hardware=hw.name, model=name, kind=kind_of(cfg),
                    batch=b, seq_len=t,
                    prefill_s=pre.seconds, prefill_tokens_per_s=pre.tokens_per_s,
                    mc_questions_per_s=b / pre.seconds, prefill_bound=pre.bound,
                    decode_step_s=dec.seconds, decode_tokens_per_s=dec.tokens_per_s,
                    decode_bound=dec.bound, weight_bytes=mem["weights"],
                    kv_cache_bytes=mem["kv_cache"], transient_bytes=mem["transient"],
                    device_bytes=mem["total"], fits=mem["total"] <= hw.memory_bytes,
                    active_params_per_token=info.active_params_per_token,
                    beyond_max_seq_len=t > cfg.decoder.max_seq_len))
    return rows


def grid_md(rows: list[dict]) -> str:
    lines = ["| hardware | model | B | T | prefill tok/s | MC q/s | prefill bound "
             "| decode tok/s | decode bound | device GB | fits |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['hardware']} | {r['model']} | {r['batch']} | {r['seq_len']} "
                     f"| {r['prefill_tokens_per_s']:,.0f} | {r['mc_questions_per_s']:.1f} "
                     f"| {r['prefill_bound']} | {r['decode_tokens_per_s']:,.0f} "
                     f"| {r['decode_bound']} | {r['device_bytes'] / 1e9:.1f} "
                     f"| {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def relative_md(rows: list[dict], dense: str, others: list[str]) -> str:
    """Hard and soft against dense at every (hardware, B, T): throughput ratios."""
    key = lambda r: (r["hardware"], r["batch"], r["seq_len"])
    base = {key(r): r for r in rows if r["model"] == dense}
    lines = ["| hardware | B | T | " + " | ".join(f"{m} prefill / dense | {m} decode / dense"
                                                 for m in others) + " |",
             "|" + "---|" * (3 + 2 * len(others))]
    for k, d in base.items():
        cells = []
        for m in others:
            r = next(x for x in rows if x["model"] == m and key(x) == k)
            cells += [f"{r['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:.2f}",
                      f"{r['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}"]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(rows: list[dict], dense: str, hard: str, soft: str) -> str:
    """The question at 7B in sentences, from the grid: hard and soft against dense per phase
    (the range of throughput ratios over B and T, where each is best and worst), and the bound
    that holds at the smallest and largest batch."""
    out = []
    key = lambda r: (r["hardware"], r["batch"], r["seq_len"])
    at = {(r["model"],) + key(r): r for r in rows}
    for hw in sorted({r["hardware"] for r in rows}):
        pts = sorted({key(r)[1:] for r in rows if r["hardware"] == hw})
        for phase in ("prefill", "decode"):
            metric = f"{phase}_tokens_per_s"
            line = [f"**{hw}, {phase}:**"]
            for name in (hard, soft):
                ratio = {p: at[(name, hw) + p][metric] / at[(dense, hw) + p][metric]
                         for p in pts if (name, hw) + p in at}
                lo, hi = min(ratio, key=ratio.get), max(ratio, key=ratio.get)
                line.append(f"{name} runs at {ratio[lo]:.2f}-{ratio[hi]:.2f}x dense "
                            f"(lowest at B={lo[0]}, T={lo[1]}; highest at B={hi[0]}, "
                            f"T={hi[1]});")
            small, large = pts[0], pts[-1]
            bounds = ", ".join(f"{m} {at[(m, hw) + small][f'{phase}_bound']} -> "
                               f"{at[(m, hw) + large][f'{phase}_bound']}"
                               for m in (dense, hard, soft))
            line.append(f"bound from B={small[0]}, T={small[1]} to B={large[0]}, "
                        f"T={large[1]}: {bounds}.")
            out.append(" ".join(line))
        fit = {m: max((r["batch"] for r in rows if r["hardware"] == hw and r["model"] == m
                       and r["seq_len"] == pts[-1][1] and r["fits"]), default=0)
               for m in (dense, hard, soft)}
        out.append(f"**{hw}, memory at T={pts[-1][1]}:** the largest batch that fits is "
                   + ", ".join(f"{m} B={b}" if b else f"{m} none" for m, b in fit.items()) + ".")
    return "\n\n".join(out)


def grid_plots(rows: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for hw in sorted({r["hardware"] for r in rows}):
        sub = [r for r in rows if r["hardware"] == hw]
        seqs = sorted({r["seq_len"] for r in sub})
        fig, axes = plt.subplots(3, len(seqs), figsize=(3.6 * len(seqs), 9), squeeze=False)
        for j, t in enumerate(seqs):
            for model in dict.fromkeys(r["model"] for r in sub):
                pts = sorted((r["batch"], r) for r in sub if r["model"] == model
                             and r["seq_len"] == t)
                bs = [b for b, _ in pts]
                for i, (key, scale) in enumerate((("prefill_tokens_per_s", 1),
                                                  ("decode_tokens_per_s", 1),
                                                  ("device_bytes", 1e-9))):
                    axes[i][j].plot(bs, [r[key] * scale for _, r in pts], marker="o",
                                    label=model)
            axes[0][j].set_title(f"T={t}")
            for i, ylabel in enumerate(("prefill tok/s", "decode tok/s", "device GB")):
                axes[i][j].set_xscale("log", base=2)
                axes[i][j].set_yscale("log")
                axes[i][j].set_xlabel("batch size")
                axes[i][0].set_ylabel(f"{ylabel} ({LABEL})")
        axes[2][0].axhline(get_hardware(hw).memory_bytes * 1e-9, color="grey", ls="--", lw=1)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"PROJECTED on {hw} by the performance model (moex.perf), not measured")
        fig.tight_layout()
        path = out / f"projected_{hw}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- 2. offloading ------------------------------------------------------------------------------

def device_bytes(cfg, hw_name: str, fraction: float, batch: int, context: int) -> dict:
    """Device memory of a decode point with `fraction` of the expert bytes resident, and
    whether it fits the hardware (weights + pool + KV cache; moex.perf.model.memory_bytes)."""
    m = memory_bytes(cfg, batch, context, offload=1.0 - fraction)
    need = m["weights"] + m["kv_cache"]
    return dict(device_bytes=need, fits=need <= get_hardware(hw_name).memory_bytes)


def offload_rows(p: ProjectConfig, source: Trace, progress: bool = True) -> list[dict]:
    plan = [(m, h, b) for m in p.offload_presets for h in p.offload_hardware
            for b in p.offload_batches]
    bar = tqdm(total=len(plan), disable=not progress, desc="project offload")
    rows = []
    for name, hardware, batch in plan:
        cfg, hw = get_config(name), get_hardware(hardware)
        trace = decode_only(trace_for(cfg, source))
        compute, transfer = sim_models(cfg, hw, p.context, trace)
        eb = expert_bytes(cfg)
        total = eb * cfg.decoder.moe.num_experts * len(expert_layers(cfg))
        # all-resident: every expert in device memory, nothing copied -- the compute bound
        resident = simulate(trace, "all-resident", total // eb, batch, eb, transfer, compute)
        resident_tps = resident.compute_bound_tokens_per_s
        base = dict(source=LABEL, hardware=hw.name, model=name, trace=trace.model,
                    batch=batch, expert_mb=eb / 1e6, resident_tokens_per_s=resident_tps)
        rows.append(dict(base, policy="all-resident", budget="100%", slots=total // eb,
                         **device_bytes(cfg, hardware, 1.0, batch, p.context),
                         tokens=resident.tokens, tokens_per_s=resident_tps,
                         hit_rate=1.0, bytes_moved=0,
                         stall_fraction=0.0, transfer_bound_tokens_per_s=float("inf"),
                         ratio_to_resident=1.0))
        for budget in p.budgets:
            slots = budget_slots(parse_budget(budget, total), eb)
            for policy in p.policies:
                spec = parse_policy(policy)
                try:
                    r = simulate(trace, spec.policy, slots, batch, eb, transfer, compute,
                                 forecaster=make_forecaster(spec, trace, trace))
                except ValueError as e:              # below the policy's minimum budget
                    rows.append(dict(base, policy=policy, budget=budget, slots=slots,
                                     skipped=str(e)))
                    continue
                rows.append(dict(base, policy=policy, budget=budget, slots=slots,
                                 **device_bytes(cfg, hardware, slots * eb / total, batch,
                                                p.context),
                                 tokens=r.tokens, tokens_per_s=r.tokens_per_s,
                                 hit_rate=r.hit_rate,
                                 bytes_moved=r.bytes_moved,
                                 stall_fraction=r.stall_s / r.total_s if r.total_s else 0.0,
                                 transfer_bound_tokens_per_s=r.transfer_bound_tokens_per_s,
                                 ratio_to_resident=r.tokens_per_s / resident_tps))
        bar.update()
    bar.close()
    return rows


def offload_md(rows: list[dict]) -> str:
    lines = ["| hardware | model | B | budget | policy | tok/s | x all-resident | hit rate "
             "| GB moved / token | transfer bound tok/s | device GB (fits) |",
             "|" + "---|" * 11]
    for r in rows:
        if "skipped" in r:
            continue
        tokens = r["tokens_per_s"]
        bound = r["transfer_bound_tokens_per_s"]
        lines.append(f"| {r['hardware']} | {r['model']} | {r['batch']} | {r['budget']} "
                     f"| {r['policy']} | {tokens:,.1f} | {r['ratio_to_resident']:.2f} "
                     f"| {r['hit_rate']:.3f} | "
                     f"{r['bytes_moved'] / 1e9 / max(r['tokens'], 1):.3f} "
                     f"| {'-' if bound == float('inf') else f'{bound:,.1f}'} "
                     f"| {r['device_bytes'] / 1e9:.1f} ({'yes' if r['fits'] else 'no'}) |")
    return "\n".join(lines)


def write(p: ProjectConfig, grid: list[dict], offload: list[dict], notes: str = "",
          more: list[dict] = (), more_md: str = "") -> pathlib.Path:
    """The report, results and plots; `more` rows and their markdown section (the precision
    projection) are appended."""
    hw = ", ".join(p.hardware)
    report = (f"# PROJECTED (performance model, not measured): dense vs hard vs soft 7B-class "
              f"VLMs on {hw}\n\n{notes}\n\n## Throughput and memory\n\n{grid_md(grid)}\n\n"
              f"## Findings\n\n{findings(grid, *p.presets[:3])}\n\n"
              f"## Against dense\n\n"
              f"{relative_md(grid, p.presets[0], list(p.presets[1:]))}\n\n"
              f"## Expert offloading (decode, context {p.context})\n\n{offload_md(offload)}\n"
              f"\n{more_md}")
    return write_outputs(p.out, grid + offload + list(more), dataclasses.asdict(p), report,
                         extra=lambda tmp: grid_plots(grid, tmp))
