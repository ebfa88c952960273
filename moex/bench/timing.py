"""Benchmark timing: warm-up, repeats, median with min/max. Never used for assertions in tests."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import jax


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
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
