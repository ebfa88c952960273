"""Sharding on JAX's own machinery: logical axis names on every param and activation, rules that
map them onto a device mesh, and the `Plan` (mesh + rules) a sharded run carries.

Mesh axes (any subset, any sizes; `parse_mesh("data=2,expert=4")`):
  data     data parallelism: the batch is split, params are replicated
  fsdp     fully sharded data parallelism: the batch is split, and so is every param's `embed` axis
           (XLA gathers a layer's params where it needs them)
  tensor   tensor (Megatron) parallelism: attention heads, MLP / expert width and the vocabulary
  expert   expert parallelism: each device holds E / n experts (and their Soft MoE slots); outside
           the MoE blocks the axis splits the batch, inside them tokens travel by all-to-all
           (moex.nn.parallel)

Logical names. Params: embed (model width), mlp (MLP / expert width), heads (attention heads),
kv (head width), experts, vocab, and None (replicated: norms, routers, small tables).
Activations: batch, length, act_embed (the width of hidden states; never split by fsdp, which
splits the params' embed), plus heads / mlp / vocab, which tensor parallelism splits in both.

Params are declared with `param(module, name, init, shape, dtype, axes)`: flax's
`nn.with_logical_partitioning` metadata, visible to `moex.model.param_specs` and unboxed
everywhere else, so the params pytree is plain arrays as before. Activations pass through
`constrain(x, names)`, a no-op unless a plan is active (`with use(plan):`, entered by whatever
jits a sharded computation: Generator, the train step, the efficiency grid). Nothing changes on
one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# One default rules set per strategy: which logical names each mesh axis splits. A mesh with
# several axes (mixed strategies) takes the union; a logical name split by several mesh axes is
# split by all of them, in MESH_AXES order (batch over data x fsdp x expert).
STRATEGIES: dict[str, tuple[str, ...]] = {
    "data": ("batch",),
    "fsdp": ("batch", "embed"),
    "tensor": ("heads", "mlp", "vocab"),
    "expert": ("batch", "experts"),
}

PARAM_NAMES = ("embed", "mlp", "heads", "kv", "experts", "vocab")
ACTIVATION_NAMES = ("batch", "length", "act_embed", "heads", "kv", "mlp", "vocab")

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def default_rules(mesh_axes) -> Rules:
    """Logical name -> mesh axes, for the mesh axes present (a name no axis splits is absent,
    i.e. replicated)."""
    out: dict[str, list[str]] = {}
    for axis in MESH_AXES:
        if axis in mesh_axes:
            for name in STRATEGIES[axis]:
                out.setdefault(name, []).append(axis)
    return tuple((name, tuple(axes)) for name, axes in out.items())


def parse_mesh(spec) -> dict[str, int]:
    """"data=2,expert=4" (or a dict) -> {"data": 2, "expert": 4}; names from MESH_AXES."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            name, eq, size = part.partition("=")
            if not eq or not size.strip().isdigit():
                raise ValueError(f"mesh {spec!r}: expected AXIS=SIZE pairs separated by commas "
                                 f"(e.g. data=2,expert=4), found {part!r}")
            items.append((name.strip(), int(size)))
    shape = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        if name in shape:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
        if int(size) < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} needs a size >= 1, found {size}")
        shape[name] = int(size)
    if not shape:
        raise ValueError(f"mesh {spec!r}: no axes (expected e.g. data=2,expert=4)")
    return shape


def make_mesh(spec, devices=None) -> Mesh:
    """A Mesh over the first prod(sizes) devices, axes in MESH_AXES order."""
    shape = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(shape.values())
    if n > len(devices):
        raise ValueError(f"mesh {format_mesh(shape)} needs {n} devices; {len(devices)} "
                         f"available ({devices[0].platform}). On CPU, set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n} before jax starts.")
    names = tuple(a for a in MESH_AXES if a in shape)
    grid = np.asarray(devices[:n], dtype=object).reshape([shape[a] for a in names])
    return Mesh(grid, names)


def format_mesh(shape) -> str:
    return ",".join(f"{k}={v}" for k, v in dict(shape).items())


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh and the rules that map logical names onto it."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def for_mesh(cls, mesh_or_spec, rules: Rules | None = None) -> "Plan":
        mesh = mesh_or_spec if isinstance(mesh_or_spec, Mesh) else make_mesh(mesh_or_spec)
        return cls(mesh, default_rules(mesh.axis_names) if rules is None else rules)

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def size(self, axis: str) -> int:
        return self.shape.get(axis, 1)

    def axes(self, name: str | None) -> tuple[str, ...]:
        """The mesh axes (of size > 1) that logical name `name` is split over."""
        for rule, mesh_axes in self.rules:
            if rule == name:
                return tuple(a for a in mesh_axes if self.size(a) > 1)
        return ()

    def spec(self, names, shape=None) -> PartitionSpec:
        """PartitionSpec for an array with logical `names` (one per dimension, None for
        replicated). With `shape`, a dimension keeps only the leading mesh axes whose product
        divides it (odd sizes replicate instead of failing); a mesh axis is used once."""
        used, out = set(), []
        for i, name in enumerate(names):
            keep, prod = [], 1
            for a in self.axes(name):
                if a in used:
                    continue
                if shape is not None and shape[i] % (prod * self.size(a)):
                    break
                keep.append(a)
                prod *= self.size(a)
            used.update(keep)
            out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
        return PartitionSpec(*out)

    def sharding(self, names, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def ways(self, name: str) -> int:
        """How many parts logical `name` is split into (at most)."""
        return math.prod(self.size(a) for a in self.axes(name))

    def describe(self) -> str:
        return f"mesh {format_mesh(self.shape)} ({self.mesh.devices.size} devices)"


def plan_for(mesh: str | None) -> Plan | None:
    """The plan of a --mesh option ("data=2,expert=4"): default rules; None stays one device."""
    return None if mesh is None else Plan.for_mesh(mesh)


_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("moex_plan", default=None)


def active() -> Plan | None:
    """The plan of the computation being traced (None: one device, nothing to do)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use(plan: Plan | None):
    """Trace (jit) a computation under `plan`; `use(None)` leaves sharding off."""
    token = _ACTIVE.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE.reset(token)


def constrain(x, names):
    """x with the sharding its logical `names` get under the active plan (no-op without one)."""
    plan = active()
    if plan is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {names} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, plan.sharding(names, x.shape))


def param(module, name: str, init, shape, dtype, axes):
    """module.param with logical axis names `axes` (one per dimension) as flax metadata."""
    shape = tuple(shape)
    if len(axes) != len(shape):
        raise ValueError(f"param {name!r} of shape {shape}: {len(axes)} logical names {axes}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


def unbox(tree):
    """Params as plain arrays (flax's partitioning metadata removed)."""
    return nn.meta.unbox(tree)


def logical_specs(boxed):
    """Boxed params (from init / eval_shape) -> the same tree of logical PartitionSpecs."""
    return nn.get_partition_spec(boxed)


def shardings(plan: Plan, specs, shapes):
    """Trees of logical specs and of shapes (arrays or ShapeDtypeStructs) -> NamedShardings."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.tree.map(lambda s, a: plan.sharding(tuple(s), a.shape), specs, shapes,
                        is_leaf=is_spec)


def batch_sharding(plan: Plan, shape) -> NamedSharding:
    """An input batch array: its leading dimension over the batch axes, the rest replicated."""
    return plan.sharding(("batch",) + (None,) * (len(shape) - 1), shape)


def put_batch(plan: Plan | None, tree):
    """Place a batch (a pytree of arrays with a leading batch dimension) on the plan's mesh.
    With several processes (multi-host) each passes its own share of the batch (its rows), and
    the global batch is their concatenation in process order."""
    if plan is None:
        return tree
    if jax.process_count() > 1:
        def put(x):
            x = np.asarray(x)
            shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            return jax.make_array_from_process_local_data(batch_sharding(plan, shape), x, shape)
        return jax.tree.map(put, tree)
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(plan, np.shape(x))), tree)


DISTRIBUTED_ENV = ("MOEX_COORDINATOR", "MOEX_NUM_PROCESSES", "MOEX_PROCESS_ID")


def initialize_distributed(environ) -> bool:
    """Join a multi-host run before any device is used (`moex` calls this first):
    MOEX_COORDINATOR=host:port MOEX_NUM_PROCESSES=N MOEX_PROCESS_ID=i on every host, or
    MOEX_DISTRIBUTED=auto where jax detects the cluster (SLURM, Open MPI, TPU pods). Then
    jax.devices() lists every host's devices and a --mesh spans them. False: single process."""
    given = [k for k in DISTRIBUTED_ENV if environ.get(k)]
    if environ.get("MOEX_DISTRIBUTED") == "auto" and not given:
        jax.distributed.initialize()
        return True
    if not given:
        return False
    if len(given) != len(DISTRIBUTED_ENV):
        missing = sorted(set(DISTRIBUTED_ENV) - set(given))
        raise ValueError(f"a multi-host launch needs all of {DISTRIBUTED_ENV}; missing "
                         f"{missing} (or set MOEX_DISTRIBUTED=auto on SLURM / Open MPI / TPU)")
    values = {k: environ[k] for k in DISTRIBUTED_ENV}
    for k in DISTRIBUTED_ENV[1:]:
        if not values[k].isdigit():
            raise ValueError(f"{k} must be a non-negative integer, found {values[k]!r}")
    jax.distributed.initialize(values["MOEX_COORDINATOR"], int(values["MOEX_NUM_PROCESSES"]),
                               int(values["MOEX_PROCESS_ID"]))
    return True


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """jax.shard_map over `mesh`; the one place its signature is used."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
