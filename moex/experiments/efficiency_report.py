"""Tables and plots of `moex.experiments.efficiency` results.

  report_md(rows, acc, routes, skipped, study, data, roles)   the markdown report
  write_plots(rows, acc, out_dir)     throughput_vs_batch.png, memory_vs_batch.png,
                                      throughput_vs_memory.png, learning_curves.png
"""

from __future__ import annotations

import pathlib
from moex.eval.circular import markdown

RESIDENT_JIT = "resident-jit"    # policy label of the whole jitted model (no offload engine)
MB = 1e6


def _mb(x) -> str:
    return f"{x / MB:.1f}"


def accuracy_md(acc: list[dict]) -> str:
    metrics = list(acc[0]["tables"])
    lines = ["| model | weights | " + " | ".join(metrics) + " | questions/s (mmbench gen) |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for a in acc:
        cells = [f"{a['tables'][m]['overall']:.3f}" for m in metrics]
        lines.append(f"| {a['model']} | {a.get('source', '')} | " + " | ".join(cells)
                     + f" | {a['questions_per_s']['mmbench']:.1f} |")
    c = acc[0]["chance"]
    lines.append("| *chance* | | " + " | ".join(f"{c.get(m, c['seed']):.3f}" for m in metrics)
                 + " | |")
    parts = ["\n".join(lines)]
    for a in acc:
        parts.append(f"**{a['model']}** per category\n\n{markdown(a['tables'])}")
    return "\n\n".join(parts)


def learning_md(acc: list[dict]) -> str:
    """Dev accuracy against training step, per trained model (from its training log)."""
    curves = [a for a in acc if a.get("learning_curve")]
    if not curves:
        return "(no training logs: the models were not trained here)"
    lines = ["| model | step | dev generated | dev likelihood | " +
             " | ".join(CATS) + " |", "|" + "---|" * (4 + len(CATS))]
    for a in curves:
        for e in a["learning_curve"]:
            cats = " | ".join(f"{e[f'dev_{c}']:.2f}" if f"dev_{c}" in e else "–" for c in CATS)
            lines.append(f"| {a['model']} | {e['step']} | {e.get('dev_generate', 0):.3f} "
                         f"| {e.get('dev_likelihood', 0):.3f} | {cats} |")
    return "\n".join(lines)


CATS = ("color", "shape", "count", "position")


def routing_md(routes: list[dict]) -> str:
    if not routes:
        return "(no hard-MoE model)"
    return "\n\n".join(
        f"**{r['model']}** ({r['source']}), {r['questions']} dev questions: expert load per "
        "MoE block (entropy of the load / log E: 1 = uniform; the busiest expert's share), and "
        "the mean Jensen-Shannon divergence (bits) between two categories' expert-usage "
        "distributions against the divergence between two halves of one category, with each "
        f"category's two most used experts.\n\n{r['markdown']}" for r in routes)


def models_md(roles: dict) -> str:
    src = roles["sources"]
    fmt = lambda names: ", ".join(f"{n} ({src[n]})" for n in names) or "none"
    return "\n".join([
        f"- accuracy and learning curves: {fmt(roles['accuracy'])}",
        f"- routing: {fmt(roles['routing'])}",
        f"- throughput and memory grid: {fmt(roles['grid'])}",
        f"- expert offloading: {fmt(roles['offload'])}"])


def throughput_md(rows: list[dict]) -> str:
    head = ("| model | B | T | prefill tok/s (min-max) | decode tok/s | MC q/s | experts MB "
            "| rest MB | KV MB | peak MB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["policy"] != RESIDENT_JIT:
            continue
        lo = r["batch"] * r["seq_len"] / r["prefill_s_max"]
        hi = r["batch"] * r["seq_len"] / r["prefill_s_min"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} "
                     f"| {r['prefill_tokens_per_s']:.0f} ({lo:.0f}-{hi:.0f}) "
                     f"| {r['decode_tokens_per_s']:.1f} | {r['mc_questions_per_s']:.2f} "
                     f"| {_mb(r['param_bytes_experts'])} | {_mb(r['param_bytes_rest'])} "
                     f"| {_mb(r['kv_cache_bytes'])} | {_mb(r['peak_device_bytes'])} |")
    return "\n".join(lines)


def relative_md(rows: list[dict]) -> str:
    """Hard-MoE and soft-MoE throughput relative to dense at each (B, T)."""
    res = {(r["kind"], r["batch"], r["seq_len"]): r for r in rows if r["policy"] == RESIDENT_JIT}
    keys = sorted({(b, t) for k, b, t in res if k == "dense"}, key=lambda x: (x[1], x[0]))
    lines = ["| B | T | hard / dense prefill | soft / dense prefill | hard / dense decode "
             "| soft / dense decode |", "|---|---|---|---|---|---|"]
    for b, t in keys:
        d = res[("dense", b, t)]
        cell = lambda kind, m: (f"{res[(kind, b, t)][m] / d[m]:.2f}" if (kind, b, t) in res
                                else "–")
        lines.append(f"| {b} | {t} | {cell('hard', 'prefill_tokens_per_s')} "
                     f"| {cell('soft', 'prefill_tokens_per_s')} "
                     f"| {cell('hard', 'decode_tokens_per_s')} "
                     f"| {cell('soft', 'decode_tokens_per_s')} |")
    return "\n".join(lines)


def offload_md(rows: list[dict]) -> str:
    off = [r for r in rows if r["policy"] != RESIDENT_JIT]
    if not off:
        return "(no hard-MoE model: nothing to offload)"
    lines = ["| model | B | T | policy | budget | decode tok/s | x jitted | prefill tok/s "
             "| device params MB | hit rate | MB moved | recomputed |", "|" + "---|" * 12]
    for r in off:
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} | {r['policy']} "
                     f"| {r['budget']} | {r['decode_tokens_per_s']:.1f} "
                     f"| {_ratio(r.get('decode_x_jitted'))} "
                     f"| {r['prefill_tokens_per_s']:.0f} | {_mb(r['device_param_bytes'])} "
                     f"| {r['hit_rate']:.2f} | {_mb(r['bytes_moved'])} "
                     f"| {r.get('recomputed_layers', '–')} |")
    return "\n".join(lines)


def _ratio(value) -> str:
    """A ratio cell (rows from before the jitted baseline was measured read '–')."""
    return "–" if value in (None, "") else f"{float(value):.2f}"


def report_md(rows, acc, routes, skipped, study, data: dict, roles: dict) -> str:
    b, s, cap = study.grid_points()
    return "\n\n".join([
        "# Dense vs hard-MoE vs soft-MoE VLMs: throughput, memory, accuracy, offloading",
        f"## Models\n\n{models_md(roles)}",
        f"Grid: batch {list(b)} x sequence length {list(s)} (image tokens + text), B x T <= {cap}; "
        f"{study.repeats} repeats after {study.warmup} warm-up, medians (min-max). Decode: one step "
        f"over the KV cache ({study.decode_steps}+ steps timed). MC q/s: multiple-choice questions "
        "per second with the answer read from the prefill's last logits. Peak: XLA's compiled "
        "prefill peak (arguments + outputs + temporaries) on CPU, the allocator's peak where the "
        "backend reports it; offload rows: dense params + slot pool + KV (accounted).",
        f"## Accuracy\n\nData: `{data['mmbench']}` (MMBench format), `{data['seed']}` (SEED "
        "format). MMBench: generated answers read by MMBench's matcher (a letter, else the "
        "option's text), CircularEval and plain (rotation 0); SEED: likelihood ranking of the "
        f"option texts and the generated answer.\n\n{accuracy_md(acc)}",
        f"## Learning curves (held-out dev split)\n\nSteps are total training steps: an upcycled "
        f"model's fine-tuning continues from its dense start's last step.\n\n{learning_md(acc)}",
        f"## Routing of the hard-MoE models\n\n{routing_md(routes)}",
        f"## Throughput and memory (all experts resident{_mesh_note(rows)})\n\n"
        f"{throughput_md(rows)}",
        f"## Relative to dense\n\n{relative_md(rows)}",
        f"## Expert offloading (live engine on the benchmark's prompts; x jitted = decode "
        f"tokens/s over the whole-model jitted decode on the same prompts; all-resident = the "
        f"same engine with every expert preloaded into the pool)\n\n{offload_md(rows)}",
        "Skipped grid points: " + (", ".join(skipped) if skipped else "none"),
        "Plots: throughput_vs_batch.png, memory_vs_batch.png, throughput_vs_memory.png, "
        "learning_curves.png" + "".join(f", routing_{r['model']}.png" for r in routes),
    ])


def write_plots(rows: list[dict], acc: list[dict], out: pathlib.Path,
                routes: list[dict] | None = None) -> list[pathlib.Path]:
    """The PNG figures of the study under `out`; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    resident = [r for r in rows if r["policy"] == RESIDENT_JIT]
    figures = [("throughput_vs_batch.png", _throughput_figure(plt, resident)),
               ("memory_vs_batch.png", _memory_figure(plt, resident)),
               ("throughput_vs_memory.png", _offload_figure(
                   plt, [r for r in rows if r["policy"] != RESIDENT_JIT])),
               ("learning_curves.png", _learning_figure(plt, acc))]
    paths = []
    for name, fig in figures:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    for r in routes or []:
        paths.append(_signature_plot(plt, r, out / f"routing_{r['model']}.png"))
    return paths


def _series(rows: list[dict], model: str, seq_len: int, key: str):
    """(batch sizes, values of `key`) of one model at one sequence length, by batch size."""
    pts = sorted((r["batch"], r[key]) for r in rows
                 if r["model"] == model and r["seq_len"] == seq_len)
    return [p[0] for p in pts], [p[1] for p in pts]


def _throughput_figure(plt, resident: list[dict]):
    models = list(dict.fromkeys(r["model"] for r in resident))
    seqs = sorted({r["seq_len"] for r in resident})
    fig, axes = plt.subplots(2, len(seqs), figsize=(4 * len(seqs), 7), squeeze=False)
    for j, t in enumerate(seqs):
        for i, (key, label) in enumerate((("prefill_tokens_per_s", "prefill tokens/s"),
                                          ("decode_tokens_per_s", "decode tokens/s"))):
            ax = axes[i][j]
            for m in models:
                ax.plot(*_series(resident, m, t, key), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_title(f"T = {t}")
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
    axes[0][0].legend()
    return fig


def _memory_figure(plt, resident: list[dict]):
    models = list(dict.fromkeys(r["model"] for r in resident))
    seqs = sorted({r["seq_len"] for r in resident})
    fig, axes = plt.subplots(1, len(seqs), figsize=(4 * len(seqs), 3.5), squeeze=False)
    for j, t in enumerate(seqs):
        ax = axes[0][j]
        for m in models:
            x, y = _series(resident, m, t, "peak_device_bytes")
            ax.plot(x, [v / MB for v in y], marker="o", label=f"{m} peak")
            x, y = _series(resident, m, t, "kv_cache_bytes")
            ax.plot(x, [v / MB for v in y], linestyle="--", label=f"{m} KV cache")
        ax.set_xscale("log", base=2)
        ax.set_title(f"T = {t}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("MB")
    axes[0][0].legend(fontsize=7)
    return fig


def _offload_figure(plt, off: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in off}):
        for policy in dict.fromkeys(r["policy"] for r in off):
            pts = sorted((r["device_param_bytes"] / MB, r["decode_tokens_per_s"]) for r in off
                         if r["batch"] == batch and r["policy"] == policy)
            ax.plot(*zip(*pts), marker="o", label=f"{policy} B={batch}")
    ax.set_xlabel("device bytes for parameters (MB): dense part + expert slot pool")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("offloaded experts: throughput vs device-memory budget")
    if off:
        ax.legend(fontsize=7)
    return fig


def _learning_figure(plt, acc: list[dict]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for a in acc:
        curve = a.get("learning_curve") or []
        for ax, key in zip(axes, ("dev_generate", "dev_likelihood")):
            pts = [(e["step"], e[key]) for e in curve if key in e]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=a["model"])
    for ax, title in zip(axes, ("MMBench dev, generated answer", "dev, likelihood ranking")):
        ax.set_xlabel("training step (upcycled: dense steps + fine-tuning)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def _signature_plot(plt, route: dict, path: pathlib.Path) -> pathlib.Path:
    """One heatmap per MoE block: question category x expert, the share of the category's
    token-expert choices that went to the expert (its routing signature)."""
    import numpy as np
    sigs = route["signatures"]
    fig, axes = plt.subplots(1, len(sigs), figsize=(2.6 * len(sigs) + 1, 2.8), squeeze=False)
    for ax, s in zip(axes[0], sigs):
        cats = list(s["signatures"])
        grid = np.asarray([s["signatures"][c] for c in cats])
        im = ax.imshow(grid, vmin=0, vmax=max(grid.max(), 1e-9), cmap="viridis")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(len(cats)), cats if ax is axes[0][0] else [""] * len(cats))
        ax.set_title(f"{s['tower']} {s['layer']}\nJS {s['between_js']:.3f} / "
                     f"{s['within_js']:.3f}", fontsize=8)
        ax.set_xlabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{route['model']}: routing signature per question category "
                 "(JS between / within categories)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _mesh_note(rows: list[dict]) -> str:
    """', sharded over MESH' when the grid ran on a mesh (`moex efficiency --mesh`)."""
    meshes = {r.get("mesh") for r in rows if r["policy"] == RESIDENT_JIT} - {None, "1 device"}
    return f", sharded over {', '.join(sorted(meshes))}" if meshes else ""
