"""Moving fewer bytes, projected: quantized stores, low-precision misses and host-computed experts
beside LRU, pre-gated and predictive, on real hardware specs (every number PROJECTED by the
replay simulator with moex.perf's compute, link and host models -- not measured).

    moex perf precision --trace runs/traces/mini-hard-vlm-project.npz --hardware h200 rtx4090
    (also a section of `moex efficiency --project ...`)

Per model, hardware, decode batch, budget, policy and variant (the store's dtype / the miss
option [/ the slot form]: `native/load` = today's bf16 offloading, `int4/load`,
`native/low:int4`, `int4/host`, `int4/host/quantized` (slots keep the int4 copies: more of them
per byte, dequantized at every use, `moex.perf.offload.dequant_seconds`), ...; see
`moex.offload.quant`, `moex.offload.misses` and `moex.offload.store`) the simulator replays the generated
tokens of the routing trace (mapped onto the model's experts, as in `projection.offload_rows`)
and reports tokens/s, its ratio to bf16 (native) LRU at the same point, hits, misses served at
low precision / on the host, bytes moved per token, and per token the time split into stall
(waiting for copies or the host), copy (link busy), device compute and host compute. Each
variant's bound (`moex.offload.simulator.miss_bound`): Belady's misses at the budget, each at
its cheapest allowed option (link copy of the stored or low-precision copy, or the host's
compute for its rows), against the device's compute, perfectly overlapped. The slot count is
the budget over the expert's device size (slots hold dequantized experts), so every variant has
the same slots, except quantized slots (budget / stored size).
"""

from __future__ import annotations

import dataclasses

from tqdm import tqdm

from moex.config import get_config
from moex.offload.cache import belady_misses, stream_from_trace
from moex.offload.misses import parse_misses
from moex.offload.quant import label as dtype_label, parse_expert_dtype
from moex.offload.policies import make_policy
from moex.offload.simulator import miss_bound, simulate_stream
from moex.offload.spec import budget_slots, parse_budget, parse_policy
from moex.offload.trace import Trace
from moex.perf.hardware import get_hardware
from moex.perf.offload import (decode_only, dequant_seconds, expert_bytes, expert_layers,
                               miss_rule, sim_models, stored_expert_bytes, trace_for)
from moex.predict.forecast import make_forecaster

BASELINE = ("lru", "native/load")
VARIANTS = ("native/load", "int8/load", "int4/load", "native/low:int4",
            "native/low:int4+upgrade", "native/host", "int8/host", "int4/host",
            "native/low:int4+host", "int8/load/quantized", "int4/load/quantized",
            "int4/host/quantized")
SLOT_FORMS = ("dequantized", "quantized")


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    presets: tuple[str, ...] = ("mixtral-8x7b",)
    hardware: tuple[str, ...] = ("h200", "rtx4090")
    batches: tuple[int, ...] = (1, 8)
    budgets: tuple[str, ...] = ("25%", "50%")
    policies: tuple[str, ...] = ("lru", "lfu", "pregated", "predictive:oracle")
    variants: tuple[str, ...] = VARIANTS
    context: int = 2048
    trace: str = ""
    out: str = "results/precision_projection"


def parse_variant(text: str):
    """'int4/host' -> (QuantFormat int4, MissSpec host, False); 'native/load' -> (None, load,
    False); 'int4/load/quantized' -> (int4, load, True): quantized slots."""
    parts = str(text).split("/")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in SLOT_FORMS):
        raise ValueError(f"variant {text!r}: expected EXPERT_DTYPE/MISSES[/SLOTS], e.g. "
                         f"int4/load, native/low:int4+host or int4/host/quantized (SLOTS one "
                         f"of {', '.join(SLOT_FORMS)})")
    fmt, misses = parse_expert_dtype(parts[0]), parse_misses(parts[1])
    quantized = len(parts) == 3 and parts[2] == "quantized"
    if quantized and (fmt is None or misses.low is not None):
        raise ValueError(f"variant {text!r}: quantized slots need an int8 / int4 store and no "
                         "low-precision copy")
    return fmt, misses, quantized


def rows_for(p: PrecisionConfig, source: Trace, progress: bool = True) -> list[dict]:
    variants = [(v, *parse_variant(v)) for v in p.variants]
    specs = [parse_policy(x) for x in p.policies]
    plan = [(m, h, b) for m in p.presets for h in p.hardware for b in p.batches]
    bar = tqdm(total=len(plan) * len(p.budgets) * len(specs) * len(variants),
               disable=not progress, desc="project precision")
    rows = []
    for name, hardware, batch in plan:
        cfg, hw = get_config(name), get_hardware(hardware)
        trace = decode_only(trace_for(cfg, source))
        compute, transfer = sim_models(cfg, hw, p.context, trace)
        stream = stream_from_trace(trace, batch)
        eb = expert_bytes(cfg)
        total = eb * cfg.decoder.moe.num_experts * len(expert_layers(cfg))
        streams = {spec: stream_from_trace(trace, batch, make_forecaster(spec, trace, trace))
                   if make_policy(spec.policy).uses_forecast else stream for spec in specs}
        for budget in p.budgets:
            slots = budget_slots(parse_budget(budget, total), eb)
            left = belady_misses(stream, slots)
            point = []
            for spec in specs:
                for label, fmt, misses, quantized in variants:
                    bar.set_postfix_str(f"{hardware} {name} B={batch} {budget} {spec.label} "
                                        f"{label}")
                    rule = miss_rule(cfg, hw, fmt, misses)
                    nbytes = stored_expert_bytes(cfg, fmt)
                    n, dq, lft = slots, 0.0, left
                    if quantized:
                        n = budget_slots(parse_budget(budget, total), nbytes)
                        dq = dequant_seconds(cfg, hw, fmt)
                        lft = belady_misses(stream, n)
                    r = simulate_stream(streams[spec], spec.policy, n, trace.moe_layers,
                                        trace.num_experts, nbytes, transfer, compute,
                                        tokens=len(trace), batch=batch, misses=rule,
                                        dequant_s=dq)
                    b = miss_bound(stream, n, nbytes, transfer, compute, rule, r.tokens, lft,
                                   dq)
                    per = 1e3 / r.tokens
                    point.append(dict(
                        hardware=hw.name, model=name, batch=batch, budget=budget, slots=n,
                        policy=spec.label, variant=label, expert_dtype=dtype_label(fmt),
                        misses_option=misses.label, quantized_slots=quantized,
                        tokens=r.tokens,
                        tokens_per_s=r.tokens_per_s, hit_rate=r.hit_rate,
                        misses=r.stats.misses, served_low=r.stats.served_low,
                        served_host=r.stats.served_host, upgrades=r.stats.upgrades,
                        stored_expert_mb=nbytes / 1e6,
                        gb_moved_per_token=r.bytes_moved / 1e9 / r.tokens,
                        stall_ms_per_token=r.stall_s * per, copy_ms_per_token=r.copy_s * per,
                        compute_ms_per_token=r.compute_s * per, host_ms_per_token=r.host_s * per,
                        bound_misses=b.misses, bound_tokens_per_s=b.tokens_per_s,
                        of_bound=r.tokens_per_s / b.tokens_per_s))
                    bar.update()
            base = next((r for r in point if (r["policy"], r["variant"]) == BASELINE), None)
            for r in point:
                r["x_bf16_lru"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            rows += point
    bar.close()
    return rows


def best(rows: list[dict]) -> list[dict]:
    """The fastest combination per (hardware, model, batch, budget)."""
    out = {}
    for r in rows:
        key = (r["hardware"], r["model"], r["batch"], r["budget"])
        if key not in out or r["tokens_per_s"] > out[key]["tokens_per_s"]:
            out[key] = r
    return list(out.values())


def markdown(rows: list[dict]) -> str:
    lines = ["| hardware | model | B | budget | policy | experts/misses | tok/s | x bf16 lru "
             "| of bound | hit | low / host served | GB / token | stall / copy / compute / "
             "host ms per token | bound tok/s |", "|" + "---|" * 14]
    for r in rows:
        x = "-" if r["x_bf16_lru"] is None else f"{r['x_bf16_lru']:.2f}"
        lines.append(
            f"| {r['hardware']} | {r['model']} | {r['batch']} | {r['budget']} | {r['policy']} "
            f"| {r['variant']} | {r['tokens_per_s']:.1f} | {x} | {r['of_bound']:.2f} "
            f"| {r['hit_rate']:.2f} | {r['served_low']} / {r['served_host']} "
            f"| {r['gb_moved_per_token']:.3f} | {r['stall_ms_per_token']:.1f} / "
            f"{r['copy_ms_per_token']:.1f} / {r['compute_ms_per_token']:.1f} / "
            f"{r['host_ms_per_token']:.1f} | {r['bound_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> str:
    """One sentence per point: the best combination against bf16 LRU and its own bound."""
    out = []
    for r in best(rows):
        x = "" if r["x_bf16_lru"] is None else f" = {r['x_bf16_lru']:.1f}x bf16 LRU"
        out.append(f"- **{r['hardware']}, {r['model']}, B={r['batch']}, {r['budget']}:** best "
                   f"{r['policy']} with {r['variant']}: {r['tokens_per_s']:.1f} tok/s{x}, "
                   f"{100 * r['of_bound']:.0f} % of its bound ({r['bound_tokens_per_s']:.1f} "
                   f"tok/s); per token {r['stall_ms_per_token']:.1f} ms stall, "
                   f"{r['copy_ms_per_token']:.1f} ms copy, {r['compute_ms_per_token']:.1f} ms "
                   f"device compute, {r['host_ms_per_token']:.1f} ms host compute.")
    return "\n".join(out)


def section(rows: list[dict]) -> str:
    return (f"## Moving fewer bytes (PROJECTED)\n\n{findings(rows)}\n\n"
            f"### Best per point\n\n{markdown(best(rows))}\n\n### All\n\n{markdown(rows)}\n")
