"""Measuring: timing (warm-up, repeats, median with min / max), memory accounting (parameter
bytes, compiled and allocator peaks), the environment record, and result files (CSV, JSON with
config and environment, markdown), written to a temp dir and renamed into place.

Used by the experiments (`moex.experiments`); never for assertions in tests.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Callable

import jax

from moex.checkpoint import staged


# -- timing ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
    median: float
    min: float
    max: float
    repeats: int


def block(x):
    return jax.block_until_ready(x)


def measure(fn, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Seconds per call of `fn()` (its result is blocked on), after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, found {repeats}")
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def environment() -> dict:
    """Hardware, backend and versions, recorded with every result file."""
    import flax
    import numpy
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
        "numpy": numpy.__version__, "backend": jax.default_backend(), "device": str(dev),
        "device_kind": getattr(dev, "device_kind", ""), "cpu_count": _cpu_count(),
    }


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- memory ---------------------------------------------------------------------------------------

def param_bytes(params) -> dict:
    """{'experts': routed expert bytes, 'rest': everything else, 'total': both}."""
    experts = rest = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        n = leaf.size * leaf.dtype.itemsize
        if "experts" in keys:
            experts += n
        else:
            rest += n
    return {"experts": experts, "rest": rest, "total": experts + rest}


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compiled_peak_bytes(jitted, *args, **kwargs) -> int | None:
    """Arguments + outputs + temporaries of one compiled call (XLA's memory analysis), an upper
    bound on the device bytes that call needs; None where the backend gives no analysis."""
    try:
        stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    except Exception:  # backends without memory analysis
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
    """The allocator's peak where the backend reports it (GPU/TPU); None on CPU."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# -- result files ---------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: one header row, a rule, then the rows (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_csv(path, rows: list[dict]) -> None:
    """Rows as CSV, columns in first-seen order (rows may differ; a missing cell is empty)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)),
                           restval="")
        w.writeheader()
        w.writerows(rows)


def write_outputs(out, rows: list[dict], config: dict, report_md: str,
                  extra: Callable[[pathlib.Path], object] | None = None) -> pathlib.Path:
    """`extra(tmp_dir)` writes further files (plots) into the staged dir before it is published."""
    with staged(out, replace=True) as tmp:
        write_csv(tmp / "results.csv", rows)
        env = environment()
        meta = {"config": config, "environment": env, "rows": rows}
        (tmp / "results.json").write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "report.md").write_text(f"{report_md}\n\nEnvironment: `{json.dumps(env)}`\n")
        if extra is not None:
            extra(tmp)
    return pathlib.Path(out)
