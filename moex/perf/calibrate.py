"""Calibrate the performance model on this machine: short microbenchmarks -> a `Hardware` spec.

    moex perf calibrate                  # ~1 min; writes runs/perf/calibration.json
    get_hardware("cpu")                  # reads it

What is measured (each jitted, warmed up, median of repeats; moex.measure), in this order, each
step fitting what the earlier ones leave unexplained:
  gemm        a chain of `layers` MLP blocks x -> x + gelu(x W1) W2 with distinct weights
              (D x F and F x D, more bytes than the last-level cache holds, as a model's
              layers are) at M = 1 ... 4096 rows. Fitted: t = (W + A) / BW + flops / peak
              (A: the matmuls' input and output activations, counted as moex.perf.counts
              counts them), the bandwidth from M <= 8 and the peak from M >= 256, medians
              (`fit_gemm`) -- the weights stream from memory while the same cores multiply,
              so the terms add. The fit's error at each M is kept in the file.
  bf16 gemm   the same chain in bfloat16 at the largest M: the bf16 peak.
  overhead    a probe decoder built from moex's own modules (PROBE: 4 layers, D 384, 6 / 3
              heads of 64, FFN 768 -- not a preset), one decode step at B = 1 over a short
              cache: what the fitted GEMM and bandwidth terms leave is per-kernel overhead,
              spread over the kernels moex.perf.counts counts.
  softmax     the probe's prefill at T = probe_seqs (512, 1536): what is left after the
              pieces' GEMM, bandwidth and overhead terms is the masked softmax of the
              attention scores, as elements per second at each key length. (A one-layer probe,
              or moex's `attend` alone on jit arguments, runs 1.5-2x slower per layer than the
              same attention inside a deeper model, so the probe has several layers.)
  link        `jax.device_put` of a 64 MB array from pinned_host to device memory (a memcpy on
              the CPU backend) and of a 4 KB one (the per-copy latency).
The result is "this CPU" as the model sees it; `moex perf validate` then predicts the small-*
presets' measured prefill and decode and reports the error at every point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import DecoderConfig, VLMConfig
from moex.generate import GREEDY, Generator
from moex.measure import environment, measure
from moex.model import build, init_params
from moex.perf.hardware import NOMINAL_CPU, Hardware, calibration_path
from moex.perf.model import predict

PROBE = VLMConfig("calibration-probe", DecoderConfig(
    vocab_size=512, d_model=384, num_layers=4, num_heads=6, num_kv_heads=3, ffn_dim=768,
    max_seq_len=4096))
NO_SOFTMAX = ((1, 1e30),)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    d_model: int = 512
    ffn_dim: int = 1024
    layers: int = 32                       # 32 x 2 x 2 MB = 128 MB of fp32 weights
    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    probe_seqs: tuple[int, ...] = (512, 1536)  # prefill lengths of the softmax probe
    probe_layers: int = 4
    repeats: int = 5
    out: str = ""                          # default: runs/perf/calibration.json ($MOEX_CALIBRATION)


def _chain(x, ws):
    for w1, w2 in ws:
        x = x + jax.nn.gelu(x @ w1) @ w2
    return x


def gemm_points(cal: CalibrationConfig, dtype=jnp.float32) -> list[dict]:
    rng = np.random.default_rng(0)
    d, f = cal.d_model, cal.ffn_dim
    ws = [(jnp.asarray(rng.normal(0, 0.02, (d, f)), dtype),
           jnp.asarray(rng.normal(0, 0.02, (f, d)), dtype)) for _ in range(cal.layers)]
    fn = jax.jit(_chain)
    size = jnp.dtype(dtype).itemsize
    out = []
    for m in (cal.rows if dtype == jnp.float32 else cal.rows[-1:]):
        x = jnp.ones((m, d), dtype)
        t = measure(lambda: fn(x, ws), warmup=1, repeats=cal.repeats).median
        out.append(dict(rows=m, seconds=t, flops=4.0 * m * d * f * cal.layers,
                        weight_bytes=2.0 * d * f * cal.layers * size,
                        act_bytes=2.0 * m * (d + f) * cal.layers * size))
    return out


def fit_gemm(points: list[dict], small: int = 8, large: int = 256) -> tuple[float, float]:
    """(bandwidth, peak FLOP/s) of t = (W + A) / BW + flops / peak, in two robust stages: the
    bandwidth from the points with at most `small` rows (their time is almost all bytes), the
    peak from those with at least `large` rows (almost all FLOPs), each the median over its
    points after removing the other term, alternated until stable. Medians keep one
    disturbed repeat from moving either. (A rows_half term would be a constant per chain,
    indistinguishable from W / BW: the calibrated CPU has rows_half 0.)"""
    lo = [p for p in points if p["rows"] <= small] or points[:1]
    hi = [p for p in points if p["rows"] >= large] or points[-1:]
    nbytes = lambda p: p["weight_bytes"] + p.get("act_bytes", 0.0)
    bw = float(np.median([nbytes(p) / p["seconds"] for p in lo]))
    peak = float(np.median([p["flops"] / p["seconds"] for p in hi]))
    for _ in range(20):
        bw = float(np.median([nbytes(p) / max(p["seconds"] - p["flops"] / peak,
                                              0.05 * p["seconds"]) for p in lo]))
        peak = float(np.median([p["flops"] / max(p["seconds"] - nbytes(p) / bw,
                                                 0.05 * p["seconds"]) for p in hi]))
    return bw, peak


def gemm_model(p: dict, bw: float, peak: float) -> float:
    return (p["weight_bytes"] + p.get("act_bytes", 0.0)) / bw + p["flops"] / peak


def _probe(cal: CalibrationConfig):
    cfg = PROBE.replace(decoder=dataclasses.replace(PROBE.decoder,
                                                    num_layers=cal.probe_layers))
    return cfg, Generator(build(cfg)), init_params(cfg, 0)


def probe_decode_seconds(gen, params, batch: int, context: int, repeats: int) -> float:
    """Median seconds of one decode step of the probe at B rows over `context` cached tokens."""
    ids = np.ones((batch, context), np.int32)
    cache, tok, _ = gen.prefill(params, ids, ids, None, max_len=context + repeats + 3)
    done, stop = jnp.zeros((batch,), bool), jnp.asarray([-1], jnp.int32)
    state = {"cache": cache, "tok": tok, "i": 0}

    def step():
        state["i"] += 1
        state["cache"], state["tok"], _, lg = gen.step(params, state["cache"], state["tok"],
                                                       done, state["i"], stop, GREEDY)
        return lg
    return measure(step, warmup=1, repeats=repeats).median


def fit_overhead(cal: CalibrationConfig, hw: Hardware, probe) -> dict:
    """Per-kernel overhead from one probe decode step (B = 1, 64 cached tokens)."""
    cfg, gen, params = probe
    context = 64
    seconds = probe_decode_seconds(gen, params, 1, context, cal.repeats)
    pred = predict(cfg, dataclasses.replace(hw, op_overhead=0.0, softmax_rates=NO_SOFTMAX),
                   "decode", 1, context + cal.repeats + 3, backend="cpu")
    ops = sum(t.piece.ops for t in pred.times)
    overhead = max(seconds - pred.seconds, 0.0) / ops
    return dict(seconds=seconds, predicted_without_overhead=pred.seconds, kernels=ops,
                op_overhead=overhead)


def fit_softmax(cal: CalibrationConfig, hw: Hardware, probe) -> list[dict]:
    """Softmax rate at each probe length (see the module docstring)."""
    cfg, gen, params = probe
    fast = dataclasses.replace(hw, softmax_rates=NO_SOFTMAX)
    out = []
    for t in cal.probe_seqs:
        ids = np.ones((1, t), np.int32)
        seconds = measure(lambda: gen.prefill(params, ids, ids, None, max_len=t + 1),
                          warmup=1, repeats=cal.repeats).median
        pred = predict(cfg, fast, "prefill", 1, t, backend="cpu")
        scores = sum(x.piece.scores for x in pred.times)
        left = max(seconds - pred.seconds, 0.05 * seconds)
        out.append(dict(seq=t, seconds=seconds, other_seconds=pred.seconds, scores=scores,
                        rate=scores / left))
    return out


def link_points(repeats: int) -> dict:
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    big = jax.device_put(np.ones(16 << 20, np.float32), host)          # 64 MB
    small = jax.device_put(np.ones(1024, np.float32), host)            # 4 KB
    t_big = measure(lambda: jax.device_put(big, device), warmup=1, repeats=repeats).median
    t_small = measure(lambda: jax.device_put(small, device), warmup=1, repeats=repeats).median
    return dict(bandwidth=big.nbytes / max(t_big - t_small, 1e-9), latency=t_small,
                big_seconds=t_big, small_seconds=t_small)


def calibrate(cal: CalibrationConfig = CalibrationConfig(), progress: bool = True) -> dict:
    """Run the microbenchmarks; return {"hardware": spec, "measurements": ..., ...}."""
    say = print if progress else (lambda *a, **k: None)
    points = gemm_points(cal)
    bw, peak = fit_gemm(points)
    for p in points:
        p["fitted_seconds"] = gemm_model(p, bw, peak)
    say(f"gemm: bandwidth {bw / 1e9:.1f} GB/s, peak {peak / 1e9:.1f} GFLOP/s; fit error max "
        f"{max(abs(p['fitted_seconds'] / p['seconds'] - 1) for p in points):.1%}")
    bf16 = gemm_points(cal, jnp.bfloat16)[0]
    peak_bf16 = bf16["flops"] / max(bf16["seconds"] - (bf16["weight_bytes"]
                                                       + bf16["act_bytes"]) / bw, 1e-9)
    link = link_points(cal.repeats)
    say(f"bf16 peak {peak_bf16 / 1e9:.1f} GFLOP/s; host->device {link['bandwidth'] / 1e9:.1f} "
        f"GB/s, {link['latency'] * 1e6:.0f} us per copy")
    hw = dataclasses.replace(
        NOMINAL_CPU, peak_flops={"float32": peak, "bfloat16": peak_bf16}, memory_bandwidth=bw,
        link_bandwidth=link["bandwidth"], link_latency=link["latency"], host_flops=peak,
        host_memory_bandwidth=bw, rows_half=0.0,
        source=f"calibrated on {platform.node()} ({os.cpu_count()} CPUs) by moex perf calibrate")
    probe = _probe(cal)
    over = fit_overhead(cal, hw, probe)
    hw = dataclasses.replace(hw, op_overhead=over["op_overhead"])
    say(f"per-kernel overhead {over['op_overhead'] * 1e6:.1f} us ({over['kernels']} kernels "
        f"per probe decode step)")
    soft = fit_softmax(cal, hw, probe)
    hw = dataclasses.replace(hw, softmax_rates=tuple((s["seq"], s["rate"]) for s in soft))
    say("softmax " + ", ".join(f"{s['rate'] / 1e9:.2f} G elements/s at {s['seq']} keys"
                               for s in soft))
    return dict(hardware=hw.as_dict(), measurements=dict(gemm=points, bf16_gemm=bf16,
                                                         overhead=over, softmax=soft,
                                                         link=link),
                config=dataclasses.asdict(cal), environment=environment())


def write_calibration(result: dict, path: str | os.PathLike | None = None) -> pathlib.Path:
    """Write atomically (temp file + rename)."""
    path = pathlib.Path(path or calibration_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2, default=float)
    os.replace(tmp, path)
    return path
