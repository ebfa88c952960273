"""Expert parallelism: MoE blocks whose experts are split over the mesh's `expert` axis, tokens
moved by all-to-all inside `shard_map` (GShard's dispatch, MaxText's layout).

Shape letters: G groups (rows / images), S tokens per group, D width, E experts, n = the expert
axis size, C capacity per expert per group, P Soft MoE slots per expert.

Hard MoE (capacity path). Each device holds whole groups (the batch is split over the batch axes,
which include `expert`) and E / n experts. Per device:
  route its tokens (the replicated router: the same decision as on one device, per group)
  dispatch one-hot into expert buffers (E, g, C, D)        (moex.nn.experts.dispatch_combine)
  all-to-all over `expert`: split E, gather groups -> (E/n, n*g, C, D): every local expert's
    tokens from every peer
  the local experts on their buffers                          (moex.nn.experts.experts_buffers)
  all-to-all back -> (E, g, C, D); combine with the routing weights
Capacity is per group, as on one device (moex.nn.routing.expert_capacity: C = ceil(cf * S * K /
E); dropless (capacity_factor None) is C = S, the most one expert can receive), so the pairs kept
and dropped are exactly the single-device router's. Volume per layer and direction: G * E * C * D
values (`all_to_all_volume`).

Hard MoE (ragged path, dropless). Where the backend has `jax.lax.ragged_all_to_all` (GPU, TPU;
`ragged_supported`), a dropless block sends only its routed pairs: each device sorts its pairs
by expert, learns every peer's per-expert counts (an all-gather of E ints), sends each shard its
experts' rows, runs the grouped matmul on what it received (sorted by local expert), and sends
the outputs back to where they came from -- G * S * K * D values per direction. XLA:CPU does not
implement the collective ("HLO opcode ragged-all-to-all is not supported"), so there the block
takes the capacity path; the ragged path's bookkeeping is tested on CPU through
`ragged_all_to_all_reference`, the same exchange built from a padded `all_to_all`.

Soft MoE. Slots live with their experts. Each device mixes its groups' tokens into all E * P
slots (dispatch and combine weights need every slot: the replicated slot parameters), sends each
expert's slots to its shard, and gets the slot outputs back: G * E * P * D values per direction
-- slots x d per group, never tokens.

Groups are padded to a multiple of the token shards (padding rows are masked: they route nowhere
and take no capacity); experts must divide by n, else the block runs unsplit (exact, replicated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from moex.nn import sharding
from moex.nn.experts import (dispatch_combine, experts_all, experts_buffers, grouped_rows,
                             inverse_permutation)
from moex.nn.routing import Routing, expert_capacity

AXIS = "expert"


def expert_parallel(num_experts: int) -> sharding.Plan | None:
    """The active plan if it splits experts over an expert axis that divides them, else None."""
    plan = sharding.active()
    if plan is None or plan.size(AXIS) == 1 or AXIS not in plan.axes("experts"):
        return None
    return plan if num_experts % plan.size(AXIS) == 0 else None


def _padded(plan, x, token_mask):
    """(x, mask, G): the mask (default: all valid), and the groups padded to a multiple of the
    token shards; padding rows are masked out, so they route nowhere and take no capacity."""
    mask = jnp.ones(x.shape[:2], bool) if token_mask is None else token_mask.astype(bool)
    g = x.shape[0]
    extra = -g % plan.ways("batch")
    if extra:
        x = jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
        mask = jnp.concatenate([mask, jnp.zeros((extra,) + mask.shape[1:], mask.dtype)])
    return x, mask, g


def _rows(plan, ndim: int):
    """PartitionSpec of a per-row array: its rows over the batch axes."""
    return P(plan.axes("batch") or None, *([None] * (ndim - 1)))


def _specs(plan, tree, lead):
    """PartitionSpecs: `lead` on dimension 0 of every leaf."""
    return jax.tree.map(lambda v: P(lead, *([None] * (v.ndim - 1))), tree)


def hard_moe_parallel(plan, x, token_mask, kernel, experts: dict, route_fn, activation: str,
                      dtype, grouped_matmul: str = "auto"):
    """The expert-parallel hard MoE this backend runs best: the ragged path when the block is
    dropless and the backend has ragged_all_to_all, else the capacity path."""
    settings = route_fn.keywords
    dropless = settings.get("capacity_factor") is None and settings.get("capacity") is None
    if dropless and ragged_supported(plan.mesh.devices.flat[0].platform):
        return hard_moe_ragged(plan, x, token_mask, kernel, experts, route_fn, activation, dtype,
                               grouped_matmul)
    return hard_moe(plan, x, token_mask, kernel, experts, route_fn, activation, dtype)


def _routed(plan, x, token_mask, kernel, experts: dict, route_fn, expert_step):
    """Each device routes its own rows (route_fn(x, kernel, mask) -> Routing: the block's router
    settings, replicated kernel) and runs expert_step(x, routing, local experts) -> y on them
    inside shard_map, experts split over the expert axis. Returns (y (G, S, Dout), Routing)
    without the padding rows."""
    x, mask, g = _padded(plan, x, token_mask)

    def body(x, mask, kernel, experts):
        with sharding.use(None):
            r = route_fn(x, kernel, mask)
            y = expert_step(x, r, experts)
        return y, (r.logits, r.probs, r.expert_ids, r.weights, r.kept, r.position)

    row = _rows(plan, 3)
    run = sharding.shard_map(body, plan.mesh,
                             (row, _rows(plan, 2), P(), _specs(plan, experts, AXIS)),
                             (row, (row,) * 6))
    y, fields = run(x, mask, kernel, experts)
    capacity = expert_capacity(x.shape[1], kernel.shape[-1], fields[2].shape[-1],
                               route_fn.keywords.get("capacity_factor"),
                               route_fn.keywords.get("capacity"))
    return y[:g], Routing(*(f[:g] for f in fields), capacity)


def hard_moe(plan, x, token_mask, kernel, experts: dict, route_fn, activation: str, dtype):
    """Expert-parallel hard MoE, capacity path: x (G, S, D) -> (y (G, S, Dout), Routing)."""
    def step(x, r, experts):
        dispatch, combine = dispatch_combine(r)
        xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), x.astype(dtype))
        xe = jax.lax.all_to_all(xe, AXIS, 0, 1, tiled=True)        # (E/n, n*g, C, D)
        ye = experts_buffers(experts, xe, activation, dtype)
        ye = jax.lax.all_to_all(ye, AXIS, 1, 0, tiled=True)        # (E, g, C, Dout)
        return jnp.einsum("gsec,egcd->gsd", combine.astype(dtype), ye)
    return _routed(plan, x, token_mask, kernel, experts, route_fn, step)


@functools.lru_cache(maxsize=None)
def ragged_supported(backend: str) -> bool:
    """Whether `backend` compiles jax.lax.ragged_all_to_all (one tiny exchange, compiled once)."""
    mesh = Mesh(np.asarray(jax.devices(backend)[:1]), ("x",))
    one = jnp.ones((1,), jnp.int32)

    def f(x):
        return jax.lax.ragged_all_to_all(x, jnp.zeros_like(x), 0 * one, one, 0 * one, one,
                                         axis_name="x")
    try:
        jax.jit(sharding.shard_map(f, mesh, P(), P())).lower(jnp.ones((2, 2), jnp.float32)).compile()
        return True
    except Exception:      # XLA:CPU: "HLO opcode ragged-all-to-all is not supported"
        return False


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      axis_name):
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, axis_name):
    """jax.lax.ragged_all_to_all's semantics from a padded all_to_all (any backend): the slice
    [input_offsets[j], + send_sizes[j]) of operand lands in peer j's output at output_offsets[j]
    (an offset on the receiver); recv_sizes[i] rows arrive from peer i."""
    n = send_sizes.shape[0]
    m = operand.shape[0]
    r = jnp.arange(m)
    chunks = jnp.stack([jnp.where((r < send_sizes[j])[:, None],
                                  operand[jnp.clip(input_offsets[j] + r, 0, m - 1)], 0)
                        for j in range(n)])                                # (n, M, D)
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)           # got[i]: from i
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # offsets from i
    rows = where[:, None] + r[None, :]                                       # (n, M)
    rows = jnp.where(r[None, :] < recv_sizes[:, None], rows, output.shape[0])  # off the end
    return output.at[rows.reshape(-1)].set(got.reshape(n * m, -1), mode="drop")


def hard_moe_ragged(plan, x, token_mask, kernel, experts: dict, route_fn, activation: str,
                    dtype, grouped_matmul: str = "auto", exchange=ragged_all_to_all):
    """Expert-parallel dropless hard MoE sending only the routed pairs: x (G, S, D) -> (y,
    Routing). `exchange` has ragged_all_to_all's signature (the reference on CPU)."""
    n = plan.size(AXIS)
    e = kernel.shape[-1]
    el = e // n

    def step(x, r, experts):
        gl, s, d = x.shape
        k = r.expert_ids.shape[-1]
        pairs = gl * s * k
        key = jnp.where(r.kept.reshape(-1), r.expert_ids.reshape(-1), e)
        order = jnp.argsort(key, stable=True)
        xs = x.reshape(gl * s, d).astype(dtype)[order // k]
        counts = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)     # mine, per expert
        every = jax.lax.all_gather(counts, AXIS)                           # (n, E)
        flow = every.reshape(n, n, el).sum(-1)                             # sender, receiver
        me = jax.lax.axis_index(AXIS)
        before = jnp.cumsum(flow, axis=0) - flow           # rows earlier senders put at j
        send = flow[me]
        send_off = jnp.cumsum(send) - send
        recv = flow[:, me]
        recv_off = before[:, me]
        got = exchange(xs, jnp.zeros((n * pairs, d), dtype), send_off, send, before[me], recv,
                       AXIS)
        # received rows: sender-major, each sender's rows sorted by my local experts
        mine = jax.lax.dynamic_slice_in_dim(every, me * el, el, axis=1)    # (n, El)
        ends = jnp.cumsum(mine.reshape(-1))
        row = jnp.arange(n * pairs)
        seg = jnp.searchsorted(ends, row, side="right")
        lkey = jnp.where(row < ends[-1], seg % el, el)
        order2 = jnp.argsort(lkey, stable=True)
        ys = grouped_rows(experts, got[order2], lkey[order2], el, activation, dtype,
                          grouped_matmul)
        ys = jnp.where((lkey[order2] < el)[:, None], ys, 0)[inverse_permutation(order2)]
        back = exchange(ys, jnp.zeros((pairs, ys.shape[-1]), dtype), recv_off, recv,
                        send_off_of_peers(flow, me), send, AXIS)
        back = jnp.where((key[order] < e)[:, None], back[:pairs], 0)
        out = back[inverse_permutation(order)].reshape(gl * s, k, -1)
        y = jnp.sum(out * r.weights.reshape(gl * s, k, 1).astype(dtype), axis=1)
        return y.reshape(gl, s, -1)
    return _routed(plan, x, token_mask, kernel, experts, route_fn, step)


def send_off_of_peers(flow, me):
    """Where, in each peer i's sorted pairs, the rows it sent to `me` began: the offsets the
    return trip writes at (flow: (sender, receiver) row counts)."""
    starts = jnp.cumsum(flow, axis=1) - flow                   # per sender, per receiver
    return starts[:, me]


def soft_moe(plan, x, token_mask, mu, scale, experts: dict, weights_fn, activation: str, dtype):
    """Expert-parallel Soft MoE: x (G, M, D) -> y (G, M, Dout). weights_fn(x, mu, scale, mask) ->
    (dispatch, combine) (G, M, E, P)."""
    x, mask, g = _padded(plan, x, token_mask)

    def body(x, mask, mu, scale, experts):
        with sharding.use(None):
            dispatch, combine = weights_fn(x, mu, scale, mask)
            p = dispatch.shape[3]
            slots = jnp.einsum("gmnp,gmd->ngpd", dispatch.astype(dtype), x.astype(dtype))
            slots = jax.lax.all_to_all(slots, AXIS, 0, 1, tiled=True)  # (E/n, n*g, P, D)
            el, gl = slots.shape[:2]
            out = experts_all(experts, slots.reshape(el, gl * p, -1), activation, dtype)
            out = jax.lax.all_to_all(out.reshape(el, gl, p, -1), AXIS, 1, 0, tiled=True)
            return jnp.einsum("gmnp,ngpd->gmd", combine.astype(dtype), out)

    row = _rows(plan, 3)
    run = sharding.shard_map(body, plan.mesh, (row, _rows(plan, 2), P(), P(),
                                               _specs(plan, experts, AXIS)), row)
    return run(x, mask, mu, scale, experts)[:g]


def all_to_all_volume(kind: str, *, groups: int, group_size: int, d_model: int,
                      num_experts: int, top_k: int = 1, capacity_factor: float | None = None,
                      slots: int = 1, out_dim: int | None = None, bytes_per_value: int = 2,
                      expert_ways: int = 1) -> dict:
    """Bytes one MoE layer's two all-to-alls move, from shapes.

    hard: G * E * C * D out and G * E * C * Dout back (C from the capacity factor; dropless C =
    S); soft: G * E * P * D and back (slots x d per group). `crossing` is the part that leaves a
    device: (n - 1) / n of it for an expert axis of n. `routed` is what a ragged all-to-all would
    move (hard: the G * S * K routed pairs)."""
    out_dim = out_dim or d_model
    if kind == "hard":
        rows = num_experts * expert_capacity(group_size, num_experts, top_k, capacity_factor)
        routed = group_size * top_k
    elif kind == "soft":
        rows = routed = num_experts * slots
    else:
        raise ValueError(f"all-to-all volume is for 'hard' or 'soft' MoE, found {kind!r}")
    total = groups * rows * (d_model + out_dim) * bytes_per_value
    return {"kind": kind, "rows_per_group": rows, "bytes": total,
            "crossing_bytes": total * (expert_ways - 1) // max(expert_ways, 1),
            "routed_bytes": groups * routed * (d_model + out_dim) * bytes_per_value}
