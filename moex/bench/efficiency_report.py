"""Tables and plots of `moex.bench.efficiency` results.

  report_md(rows, acc, skipped, ec)   the markdown report
  write_plots(rows, out_dir)          throughput_vs_batch.png, memory_vs_batch.png,
                                      throughput_vs_memory.png
"""

from __future__ import annotations

import pathlib

from moex.bench.efficiency import JIT

MB = 1e6


def _mb(x) -> str:
    return f"{x / MB:.1f}"


def accuracy_md(acc: list[dict]) -> str:
    from moex.eval.circular import markdown
    metrics = list(acc[0]["tables"])
    lines = ["| model | " + " | ".join(metrics) + " | questions/s (mmbench gen) |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for a in acc:
        cells = [f"{a['tables'][m]['overall']:.3f}" for m in metrics]
        lines.append(f"| {a['model']} | " + " | ".join(cells)
                     + f" | {a['questions_per_s']['mmbench']:.1f} |")
    c = acc[0]["chance"]
    lines.append("| *chance* | " + " | ".join(f"{c.get(m, c['seed']):.3f}" for m in metrics)
                 + " | |")
    parts = ["\n".join(lines)]
    for a in acc:
        parts.append(f"**{a['model']}** per category\n\n{markdown(a['tables'])}")
    return "\n\n".join(parts)


def throughput_md(rows: list[dict]) -> str:
    head = ("| model | B | T | prefill tok/s (min-max) | decode tok/s | MC q/s | experts MB "
            "| rest MB | KV MB | peak MB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["policy"] != JIT:
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
    res = {(r["kind"], r["batch"], r["seq_len"]): r for r in rows if r["policy"] == JIT}
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
    off = [r for r in rows if r["policy"] != JIT]
    if not off:
        return "(no hard-MoE model: nothing to offload)"
    lines = ["| model | B | T | policy | budget | decode tok/s | prefill tok/s | device params MB "
             "| hit rate | MB moved | stall |", "|" + "---|" * 11]
    for r in off:
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} | {r['policy']} "
                     f"| {r['budget']} | {r['decode_tokens_per_s']:.1f} "
                     f"| {r['prefill_tokens_per_s']:.0f} | {_mb(r['device_param_bytes'])} "
                     f"| {r['hit_rate']:.2f} | {_mb(r['bytes_moved'])} "
                     f"| {r['stall_fraction']:.2f} |")
    return "\n".join(lines)


def report_md(rows, acc, skipped, ec, data: dict) -> str:
    b, s, cap = ec.grid_points()
    return "\n\n".join([
        "# Dense vs hard-MoE vs soft-MoE VLMs: throughput, memory, accuracy, offloading",
        f"Grid: batch {list(b)} x sequence length {list(s)} (image tokens + text), B x T <= {cap}; "
        f"{ec.repeats} repeats after {ec.warmup} warm-up, medians (min-max). Decode: one step "
        f"over the KV cache ({ec.decode_steps}+ steps timed). MC q/s: multiple-choice questions "
        "per second with the answer read from the prefill's last logits. Peak: XLA's compiled "
        "prefill peak (arguments + outputs + temporaries) on CPU, the allocator's peak where the "
        "backend reports it; offload rows: dense params + slot pool + KV (accounted).",
        f"## Accuracy\n\nData: `{data['mmbench']}` (MMBench format), `{data['seed']}` (SEED "
        "format). MMBench: generated answers, CircularEval and plain (rotation 0); SEED: "
        f"likelihood ranking of the option texts and generated letter.\n\n{accuracy_md(acc)}",
        f"## Throughput and memory (all experts resident)\n\n{throughput_md(rows)}",
        f"## Relative to dense\n\n{relative_md(rows)}",
        f"## Expert offloading (live engine, layer by layer; all-resident = the same engine "
        f"with every expert in the pool)\n\n{offload_md(rows)}",
        "Skipped grid points: " + (", ".join(skipped) if skipped else "none"),
        "Plots: throughput_vs_batch.png, memory_vs_batch.png, throughput_vs_memory.png",
    ])


def write_plots(rows: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = [r for r in rows if r["policy"] == JIT]
    models = list(dict.fromkeys(r["model"] for r in res))
    seqs = sorted({r["seq_len"] for r in res})
    paths = []

    def series(model, t, key):
        pts = sorted((r["batch"], r[key]) for r in res if r["model"] == model and r["seq_len"] == t)
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, len(seqs), figsize=(4 * len(seqs), 7), squeeze=False)
    for j, t in enumerate(seqs):
        for i, (key, label) in enumerate((("prefill_tokens_per_s", "prefill tokens/s"),
                                          ("decode_tokens_per_s", "decode tokens/s"))):
            ax = axes[i][j]
            for m in models:
                ax.plot(*series(m, t, key), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_title(f"T = {t}")
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
    axes[0][0].legend()
    fig.tight_layout()
    paths.append(out / "throughput_vs_batch.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(seqs), figsize=(4 * len(seqs), 3.5), squeeze=False)
    for j, t in enumerate(seqs):
        ax = axes[0][j]
        for m in models:
            x, y = series(m, t, "peak_device_bytes")
            ax.plot(x, [v / MB for v in y], marker="o", label=f"{m} peak")
            x, y = series(m, t, "kv_cache_bytes")
            ax.plot(x, [v / MB for v in y], linestyle="--", label=f"{m} KV cache")
        ax.set_xscale("log", base=2)
        ax.set_title(f"T = {t}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("MB")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "memory_vs_batch.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    off = [r for r in rows if r["policy"] != JIT]
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
    fig.tight_layout()
    paths.append(out / "throughput_vs_memory.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
