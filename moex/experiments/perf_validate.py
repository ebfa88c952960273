"""The calibrated model against measurement: predicted and measured prefill and decode times of
the small-* presets over the CPU grid, side by side, with the error at every point.

    moex perf validate                        # calibrates first if runs/perf has no calibration
    moex perf validate --family tiny --batch 1 2 --seq 64

Measurements come from `moex.experiments.throughput.run_point` (the grid of `moex compare` and
of the main job: jitted prefill and decode step, warm-up, median of repeats); predictions from
`moex.perf.model.predict` on the calibrated `cpu` spec with the CPU expert routes and a uniform
routing model (the grid uses random weights). Prefill: B rows of T tokens with one image each;
decode: one step over the cache buffer the grid allocates (T + decode steps + 1 entries).
Results under --out: validation.csv / .json and report.md.
"""

from __future__ import annotations

import dataclasses
import statistics

from tqdm import tqdm

from moex.config import get_config
from moex.experiments.throughput import CompareConfig, run_point
from moex.generate import Generator
from moex.measure import write_outputs
from moex.model import build, init_params
from moex.perf.hardware import Hardware
from moex.perf.model import predict

TOLERANCE = 0.25


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    family: str = "small"
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    seq_lens: tuple[int, ...] = (256, 1024, 2048)
    max_tokens: int = 8192                  # the CPU grid's cap on B x T (vlm_efficiency GRIDS)
    decode_steps: int = 16                  # timed decode steps: decode varies run to run
    warmup: int = 2
    repeats: int = 7
    seed: int = 0
    out: str = "results/perf_validate"

    def points(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batch_sizes for s in self.seq_lens
                if b * s <= self.max_tokens]


def cache_len(seq: int, grid: CompareConfig) -> int:
    """The cache buffer run_point allocates (what a decode step reads)."""
    return seq + grid.warmup + max(grid.repeats, grid.decode_steps) + 1


def measure_and_predict(v: ValidateConfig, hw: Hardware, progress: bool = True) -> list[dict]:
    grid = CompareConfig(family=v.family, decode_steps=v.decode_steps, warmup=v.warmup,
                         repeats=v.repeats, seed=v.seed)
    names = [f"{v.family}-{k}" for k in ("dense", "hard", "soft")]
    bar = tqdm(total=len(names) * len(v.points()), disable=not progress, desc="validate")
    rows = []
    for name in names:
        cfg = get_config(name)
        gen, params = Generator(build(cfg)), init_params(cfg, v.seed)
        for b, s in v.points():
            bar.set_postfix_str(f"{name} B={b} T={s}")
            m = run_point(gen, params, cfg, b, s, grid, peak=False)
            pre = predict(cfg, hw, "prefill", b, s, backend="cpu")
            dec = predict(cfg, hw, "decode", b, cache_len(s, grid), backend="cpu")
            for phase, measured, p in (("prefill", m["prefill_s_median"], pre),
                                       ("decode", m["decode_step_s_median"], dec)):
                rows.append(dict(model=name, phase=phase, batch=b, seq_len=s,
                                 measured_s=measured, predicted_s=p.seconds,
                                 error=p.seconds / measured - 1, bound=p.bound,
                                 measured_min_s=m[f"{phase}_s_min" if phase == "prefill"
                                                  else "decode_step_s_min"],
                                 measured_max_s=m[f"{phase}_s_max" if phase == "prefill"
                                                  else "decode_step_s_max"]))
            bar.update()
    bar.close()
    return rows


def summary(rows: list[dict]) -> dict:
    errors = [abs(r["error"]) for r in rows]
    return dict(points=len(rows), median_abs_error=statistics.median(errors),
                max_abs_error=max(errors), within=sum(e <= TOLERANCE for e in errors),
                tolerance=TOLERANCE)


def markdown(rows: list[dict], hw: Hardware) -> str:
    s = summary(rows)
    lines = [f"# Performance model against measurement ({hw.name}: {hw.source})", "",
             f"Median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}; "
             f"{s['within']} of {s['points']} points within {TOLERANCE:.0%}.", "",
             "| model | phase | B | T | measured ms (min-max) | predicted ms | error | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['phase']} | {r['batch']} | {r['seq_len']} "
                     f"| {r['measured_s'] * 1e3:.2f} ({r['measured_min_s'] * 1e3:.2f}-"
                     f"{r['measured_max_s'] * 1e3:.2f}) | {r['predicted_s'] * 1e3:.2f} "
                     f"| {r['error']:+.1%} | {r['bound']} |")
    return "\n".join(lines)


def validate(v: ValidateConfig, hw: Hardware, progress: bool = True) -> tuple[list[dict], str]:
    rows = measure_and_predict(v, hw, progress)
    report = markdown(rows, hw)
    write_outputs(v.out, rows, dict(config=dataclasses.asdict(v), hardware=hw.as_dict(),
                                    summary=summary(rows)), report)
    return rows, report
