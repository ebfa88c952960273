"""Memory accounting: parameter bytes split into experts / the rest, and compiled peak bytes."""

from __future__ import annotations

import jax


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
