"""The GPU check: measure on a lent accelerator what the performance model projects, and print
each prediction beside its measurement. Sized to finish within 8 minutes on one H200.

    python experiments/gpu_check.py                  # on the GPU machine
    python experiments/gpu_check.py --tiny           # CPU smoke test (tiny presets, seconds)

The offload bench runs first (it cannot stop halfway), then the grid points until the time
limit.
1. Efficiency grid: the 7B-class dense, hard and soft presets (llava-1.5-7b, -hard, -soft) with
   random weights in bf16, B in {1, 8, 32} x T in {1024, 4096}: jitted prefill and decode step
   (moex.experiments.throughput.run_point: warm-up, median of repeats), each beside
   `moex.perf.model.predict` for the same config on --hardware. The decoder keeps `layers`
   of its layers (default 4 of 32: compiling 18 grid points of the full depth would not fit
   the time), the vision tower all of them; the prediction is for exactly the model measured,
   and the full-depth projection is printed beside it.
2. Offload bench: a Mixtral-shaped model (mixtral-8x7b with `offload_layers` layers, 352 MB
   bf16 experts) through the live engine (moex.experiments.offload_grid) at 50 % and 25 %
   expert budgets, lru and pregated, beside the replay simulator with model-derived times on
   the trace of the same prompts and generation (moex.perf.offload): its decode tokens/s
   (the time after the prefill forward) and hit rate (prefill included, as the engine counts).
3. The host -> device link as jax sees it (pinned_host -> device device_put), beside the
   spec's link bandwidth (REFERENCES.md: it can fall far below the PCIe peak).
A point that fails (out of memory, ...) is reported and the check goes on; points left when
`time_limit_s` is reached are reported as skipped. Results: results.csv / .json and report.md
under --out.
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import jax
import numpy as np

from moex.checkpoint import LoadedModel
from moex.config import get_config
from moex.experiments.offload_grid import OffloadBenchConfig, prompts
from moex.experiments.offload_grid import run as offload_run
from moex.experiments.throughput import CompareConfig, run_point
from moex.generate import Generator
from moex.measure import environment, write_outputs
from moex.model import build, init_params
from moex.offload.forecast import reference_run
from moex.offload.simulator import simulate
from moex.offload.spec import budget_slots
from moex.offload.store import ExpertStore
from moex.perf.calibrate import link_points
from moex.perf.hardware import get_hardware
from moex.perf.model import predict
from moex.perf.offload import expert_bytes, sim_models
from moex.experiments.perf_validate import cache_len
from moex.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class GpuCheckConfig:
    presets: tuple[str, ...] = ("llava-1.5-7b", "llava-1.5-7b-hard", "llava-1.5-7b-soft")
    layers: int = 4                          # decoder layers kept (0: all)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_lens: tuple[int, ...] = (1024, 4096)
    dtype: str = "bfloat16"
    hardware: str = "h200"                   # the spec the predictions use
    repeats: int = 3
    decode_steps: int = 4
    offload_preset: str = "mixtral-8x7b"
    offload_layers: int = 4
    budgets: tuple[str, ...] = ("50%", "25%")
    policies: tuple[str, ...] = ("lru", "pregated")
    offload_batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 8
    time_limit_s: float = 400.0
    tiny: bool = False                       # CPU smoke test: tiny presets, small grid
    out: str = "results/gpu_check"

    def resolved(self) -> "GpuCheckConfig":
        if not self.tiny:
            return self
        return dataclasses.replace(
            self, presets=("tiny-dense", "tiny-hard", "tiny-soft"), layers=0,
            batch_sizes=(1,), seq_lens=(64,), dtype="float32", hardware="cpu", repeats=1,
            decode_steps=2, offload_preset="tiny-hard", offload_layers=0, budgets=("50%",),
            policies=("lru",), offload_batches=(1,), new_tokens=3)


def shaped(name: str, layers: int, dtype: str):
    """The preset with `layers` decoder layers (0: all) in `dtype`."""
    cfg = get_config(name)
    if layers:
        cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, num_layers=layers),
                          name=f"{name}[{layers}L]")
    return cfg.replace(dtype=dtype, param_dtype=dtype)


def grid_rows(c: GpuCheckConfig, hw, deadline: float) -> list[dict]:
    grid = CompareConfig(decode_steps=c.decode_steps, warmup=1, repeats=c.repeats)
    rows = []
    for name in c.presets:
        cfg = shaped(name, c.layers, c.dtype)
        full = shaped(name, 0, c.dtype)
        gen, params = Generator(build(cfg)), init_params(cfg, 0)
        for b in c.batch_sizes:
            for t in c.seq_lens:
                row = dict(part="grid", model=cfg.name, batch=b, seq_len=t)
                for phase, ctx in (("prefill", t), ("decode", cache_len(t, grid))):
                    row[f"predicted_{phase}_s"] = predict(cfg, hw, phase, b, ctx).seconds
                    row[f"projected_full_{phase}_s"] = predict(full, hw, phase, b, ctx).seconds
                if time.perf_counter() > deadline:
                    rows.append(dict(row, status="skipped (time limit)"))
                    continue
                try:
                    m = run_point(gen, params, cfg, b, t, grid, peak=False)
                except Exception as e:                   # OOM and the like: report, go on
                    rows.append(dict(row, status=f"failed: {type(e).__name__}: "
                                                 f"{str(e).splitlines()[0][:200]}"))
                    continue
                rows.append(dict(row, status="ok", measured_prefill_s=m["prefill_s_median"],
                                 measured_decode_s=m["decode_step_s_median"],
                                 prefill_error=row["predicted_prefill_s"] / m["prefill_s_median"] - 1,
                                 decode_error=row["predicted_decode_s"] / m["decode_step_s_median"] - 1))
                print(_grid_line(rows[-1]), flush=True)
        del params, gen
    return rows


def offload_rows(c: GpuCheckConfig, hw, deadline: float) -> list[dict]:
    cfg = shaped(c.offload_preset, c.offload_layers, c.dtype)
    if time.perf_counter() > deadline:
        return [dict(part="offload", model=cfg.name, status="skipped (time limit)")]
    model = LoadedModel(cfg, init_params(cfg, 0), ByteTokenizer(), "random weights (seed 0)")
    store = ExpertStore.from_params(cfg, model.params)
    bench = OffloadBenchConfig(preset=cfg.name, policies=("all-resident",) + c.policies,
                               budgets=("100%",) + c.budgets, batch_sizes=c.offload_batches,
                               prompt_len=32, new_tokens=c.new_tokens, repeats=c.repeats,
                               out=f"{c.out}/offload")
    try:
        measured, _ = offload_run(bench, progress=False, model=model, store=store)
    except Exception as e:
        traceback.print_exc()
        return [dict(part="offload", model=cfg.name, status=f"failed: {type(e).__name__}: {e}")]
    eb = expert_bytes(cfg)
    rows = []
    for b in c.offload_batches:
        ids, mask, images = prompts(model, b, bench.prompt_len, bench.seed + b)
        trace = reference_run(cfg, store, ids, mask, images, new_tokens=c.new_tokens).trace()
        compute, transfer = sim_models(cfg, hw, int(ids.shape[1]) + c.new_tokens, trace)
        prefill = int(trace.forward[trace.phase == 0].max())
        steps = len(np.unique(trace.forward[trace.phase == 1]))
        for r in (x for x in measured if x["batch"] == b):
            policy = r["policy"].split(":")[0]
            sim = simulate(trace, policy, budget_slots(r["budget_bytes"], eb), None, eb,
                           transfer, compute)
            rows.append(dict(part="offload", model=cfg.name, batch=b, budget=r["budget"],
                             policy=r["policy"], status="ok",
                             measured_decode_tok_s=r["decode_tok_s"],
                             measured_hit_rate=r["hit_rate"], simulated_hit_rate=sim.hit_rate,
                             predicted_tok_s=b * steps / sim.seconds_after(prefill)))
            print(_offload_line(rows[-1]), flush=True)
    return rows


def _grid_line(r: dict) -> str:
    return (f"{r['model']:>24} B={r['batch']:<3} T={r['seq_len']:<5} prefill "
            f"{r['measured_prefill_s'] * 1e3:9.2f} ms measured {r['predicted_prefill_s'] * 1e3:9.2f} "
            f"predicted ({r['prefill_error']:+.0%}) | decode {r['measured_decode_s'] * 1e3:8.2f} "
            f"measured {r['predicted_decode_s'] * 1e3:8.2f} predicted ({r['decode_error']:+.0%})")


def _offload_line(r: dict) -> str:
    return (f"{r['model']:>24} B={r['batch']:<3} {r['budget']:>5} {r['policy']:<12} decode "
            f"{r['measured_decode_tok_s']:8.1f} tok/s measured; simulated with model times "
            f"{r['predicted_tok_s']:8.1f}; hit {r['measured_hit_rate']:.2f} "
            f"measured, {r['simulated_hit_rate']:.2f} simulated")


def report(c: GpuCheckConfig, rows: list[dict], link: dict, hw) -> str:
    lines = [f"# GPU check on {jax.devices()[0].device_kind} (predictions: {hw.name}, "
             f"{hw.source})", "",
             f"host -> device (jax device_put, pinned_host -> device): "
             f"{link['bandwidth'] / 1e9:.1f} GB/s measured, {hw.link_bandwidth / 1e9:.1f} GB/s "
             f"in the spec; {link['latency'] * 1e6:.0f} us per small copy", "",
             "| model | B | T | prefill ms measured | predicted | error | decode ms measured "
             "| predicted | error | full-depth prefill / decode ms projected | status |",
             "|" + "---|" * 11]
    for r in (x for x in rows if x["part"] == "grid"):
        ok = r["status"] == "ok"
        ms = lambda k: f"{r[k] * 1e3:.2f}" if ok else "-"
        err = lambda k: f"{r[k]:+.0%}" if ok else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} | {ms('measured_prefill_s')} "
                     f"| {r['predicted_prefill_s'] * 1e3:.2f} | {err('prefill_error')} "
                     f"| {ms('measured_decode_s')} | {r['predicted_decode_s'] * 1e3:.2f} "
                     f"| {err('decode_error')} | {r['projected_full_prefill_s'] * 1e3:.1f} / "
                     f"{r['projected_full_decode_s'] * 1e3:.2f} | {r['status']} |")
    lines += ["", "| model | B | budget | policy | decode tok/s measured | simulated (model "
              "times) | hit measured | hit simulated | status |", "|" + "---|" * 9]
    for r in (x for x in rows if x["part"] == "offload"):
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | | | | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['budget']} | {r['policy']} "
                     f"| {r['measured_decode_tok_s']:.1f} | {r['predicted_tok_s']:.1f} "
                     f"| {r['measured_hit_rate']:.2f} | {r['simulated_hit_rate']:.2f} | ok |")
    return "\n".join(lines)


def check(c: GpuCheckConfig) -> str:
    c = c.resolved()
    start = time.perf_counter()
    deadline = start + c.time_limit_s
    hw = get_hardware(c.hardware)
    print(f"gpu check on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"predictions for {hw.name}", flush=True)
    link = link_points(c.repeats)
    rows = offload_rows(c, hw, deadline)
    rows += grid_rows(c, hw, deadline)
    text = report(c, rows, link, hw) + f"\n\nwall time {time.perf_counter() - start:.0f} s"
    write_outputs(c.out, rows, dict(config=dataclasses.asdict(c), link=link,
                                    hardware=hw.as_dict(), environment=environment()), text)
    print(text)
    return text
