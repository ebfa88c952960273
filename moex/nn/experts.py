"""Expert computation for hard routing: several computations that must agree.

Shape letters: G groups, S tokens per group, D model width, E experts, F expert width, K choices per
token, C capacity, N = G*S*K token-expert pairs.

Expert params are a plain dict, stacked over experts:
  w_up (E, D, F), w_gate (E, D, F) [swiglu only], w_down (E, F, D), and with biases
  b_up (E, F), b_gate (E, F), b_down (E, D).

`compute` (one of COMPUTE, the `MoEConfig.compute` field) names how the routed pairs are computed:
  sorted     sort the N pairs by expert, one grouped matmul per weight (`jax.lax.ragged_dot`
             semantics, by the kernel `grouped_matmul`: see moex.nn.grouped), unsort, weighted
             sum over K. Dropless, FLOPs of the chosen pairs only.
  gather     each pair's weights gathered (for a handful of pairs: batch-1 decode).
  broadcast  every expert on every token, as batched matmuls that read each expert's weights in
             place (for few tokens: batched decode; not from a slot pool, which holds other
             layers' experts too). The blocked kernel copies each expert's weights out of the
             stack and runs windows of at least 32 rows, so with few rows per expert it moves
             several times the weight bytes; broadcast spends E/K times the FLOPs instead, which
             is cheap while the step is bound by reading weights.
  auto       sorted, gather or broadcast, picked from static shapes by `resolve_compute`: with
             the blocked kernel (CPU) at most E/4 pairs gather, at most BROADCAST_TOKENS tokens
             broadcast, more sort; with ragged_dot (a grouped GEMM on GPU / TPU) always sorted.
  dense      GShard one-hot einsum: dispatch (G, S, E, C) -> expert buffers (E, G, C, D) ->
             combine. The reference, and the differentiable route training takes; C = capacity
             (S when dropless).
The first four compute per-pair outputs (`pair_outputs`, combined by `combine_pairs`); `dense`
combines inside its einsum. `experts_loop` is a plain Python loop over experts on host arrays,
for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moex.config import COMPUTE, PAIR_COMPUTE
from moex.nn import grouped
from moex.nn.layers import activation_fn
from moex.nn.sharding import param
from moex.nn.routing import Routing


def _hidden(params, activation, up, gate=None):
    """Expert hidden activations from the pre-activation projections."""
    if activation == "swiglu":
        return jax.nn.silu(gate) * up
    return activation_fn(activation)(up)


BROADCAST_TOKENS = 32   # tokens up to which the blocked kernel's 'auto' runs every expert on all


def resolve_compute(compute: str, n_tokens: int, k: int, num_experts: int,
                    grouped_matmul: str = "auto", pooled: bool = False) -> str:
    """The route ('sorted', 'gather', 'broadcast' or 'dense') that `compute` names for G*S =
    n_tokens tokens x K choices over E experts; 'auto' decides from these static shapes and the
    kernel. pooled: the weights are a slot pool (moex.offload) that may hold every layer's
    experts, which broadcasting would all run; 'auto' then gathers (up to E/2 pairs) or sorts."""
    if compute not in COMPUTE:
        raise ValueError(f"expert compute must be one of {COMPUTE}, found {compute!r}")
    if compute != "auto":
        return compute
    if grouped.resolve_grouped_matmul(grouped_matmul) != "blocked":
        return "sorted"                      # ragged_dot is a grouped GEMM on GPU / TPU
    pairs = n_tokens * k
    if pooled:
        return "gather" if 2 * pairs <= num_experts else "sorted"
    if 4 * pairs <= num_experts:
        return "gather"
    return "broadcast" if n_tokens <= BROADCAST_TOKENS else "sorted"


def experts_routed(params: dict, x, routing: Routing, activation: str, dtype=jnp.float32,
                   compute: str = "auto", grouped_matmul: str = "auto", slot_of=None):
    """x (G, S, D) -> (G, S, Dout): the routed experts' outputs weighted and summed over K, by
    the route `compute` (see the module docstring).

    slot_of: optional (E,) int32 (pair routes only); expert e's weights are then
    params[w][slot_of[e]] (a slot pool, moex.offload). Every expert that receives tokens must
    have a slot.
    """
    if compute == "dense":
        if slot_of is not None:
            raise ValueError("compute 'dense' reads the stacked experts; weights from a slot "
                             f"pool need one of the pair routes {PAIR_COMPUTE}")
        return experts_dense(params, x, routing, activation, dtype)
    pairs = pair_outputs(params, x, routing, activation, dtype, compute, grouped_matmul, slot_of)
    return combine_pairs(pairs, routing.weights, dtype)


def combine_pairs(pairs, weights, dtype=jnp.float32):
    """Pair outputs (G*S, K, Dout) and routing weights (G, S, K) -> (G, S, Dout): each token's
    outputs weighted and summed over its K choices."""
    g, s, k = weights.shape
    w = weights.reshape(g * s, k, 1).astype(dtype)
    return jnp.sum(pairs * w, axis=1).reshape(g, s, pairs.shape[-1])


def pair_outputs(params: dict, x, routing: Routing, activation: str, dtype=jnp.float32,
                 compute: str = "auto", grouped_matmul: str = "auto", slot_of=None,
                 active=None):
    """Expert outputs (G*S, K, Dout) of the token-expert pairs of x (G, S, D): pair (n, k) is
    token n through expert routing.expert_ids[n, k]; pairs not kept give 0, and with `active`
    ((E,) bool) so do the pairs of inactive experts (the offload engine computes a layer's
    experts in rounds). `compute` is one of PAIR_COMPUTE; slot_of as in `experts_routed`.

    The route depends on static shapes only, and inactive pairs are dropped before sorting, so
    the active experts' rows go through the same row windows as when every expert is active: a
    pair's output does not depend on which other experts are active.
    """
    g, s, d = x.shape
    k = routing.expert_ids.shape[-1]
    e = routing.num_experts
    xf = x.reshape(g * s, d).astype(dtype)
    ids = routing.expert_ids.reshape(-1)
    keep = routing.kept.reshape(-1)
    if active is not None:
        keep = keep & active[ids]
    how = resolve_compute(compute, g * s, k, e, grouped_matmul, pooled=slot_of is not None)
    if how == "gather":
        ys = _gathered_pairs(params, xf, ids, keep, k, activation, dtype, slot_of)
    elif how == "broadcast":
        ys = _broadcast_pairs(params, xf, ids, keep, k, activation, dtype, slot_of)
    elif how == "sorted":
        ys = _sorted_pairs(params, xf, ids, keep, k, e, activation, dtype, grouped_matmul,
                           slot_of)
    else:
        raise ValueError(f"compute {compute!r} has no per-pair outputs; pair routes are "
                         f"{PAIR_COMPUTE}")
    return ys.reshape(g * s, k, ys.shape[-1])


def _gathered_pairs(params, xf, ids, keep, k, activation, dtype, slot_of):
    """Expert outputs of every pair (N, Dout), each through its own expert's gathered weights
    (exactly the weights needed; for a handful of pairs)."""
    p = {n: jnp.asarray(v, dtype) for n, v in params.items()}
    slots = ids if slot_of is None else slot_of[ids]
    rows = xf[jnp.arange(ids.shape[0]) // k]             # pair n belongs to token n // K
    ys = jax.vmap(lambda xr, i: _expert_fn(p, i, activation)(xr[None])[0])(rows, slots)
    return jnp.where(keep[:, None], ys, 0)


def _broadcast_pairs(params, xf, ids, keep, k, activation, dtype, slot_of):
    """Expert outputs of every pair (N, Dout): every expert (or pool slot) on every token as
    batched matmuls over the stacked weights (read in place, never copied), then each pair's
    row picked out."""
    p = {n: jnp.asarray(v, dtype) for n, v in params.items()}
    stacks = p["w_down"].shape[0]
    every = experts_all(p, jnp.broadcast_to(xf, (stacks,) + xf.shape), activation, dtype)
    slots = ids if slot_of is None else slot_of[ids]
    ys = every[slots, jnp.arange(ids.shape[0]) // k]     # (E, G*S, Dout) -> (N, Dout)
    return jnp.where(keep[:, None], ys, 0)


def _sorted_pairs(params, xf, ids, keep, k, e, activation, dtype, grouped_matmul, slot_of):
    """Expert outputs of every token-expert pair (N, Dout), in pair order, computed on pairs
    sorted by expert (grouped matmul)."""
    key = jnp.where(keep, ids, e)                        # dropped pairs sort last, outside groups
    order = jnp.argsort(key, stable=True)                # (N,)
    xs = xf[order // k]                                  # pair n belongs to token n // K
    ys = grouped_rows(params, xs, key[order], e, activation, dtype, grouped_matmul, slot_of)
    ys = jnp.where(keep[order][:, None], ys, 0)
    return ys[inverse_permutation(order)]


def inverse_permutation(order):
    """The permutation that undoes `order` (unsorting by a gather: a float scatter is slow on
    CPU)."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def grouped_rows(params: dict, xs, sorted_key, e: int, activation: str, dtype=jnp.float32,
                 grouped_matmul: str = "auto", slot_of=None):
    """Rows xs (M, D) sorted by expert (sorted_key (M,): the expert of each row, e for rows in
    no group, which sort last) through their experts' MLPs -> (M, Dout); rows in no group give
    0 or garbage (the caller masks them). The grouped matmul of the sorted route."""
    group_sizes = jnp.bincount(sorted_key, length=e + 1)[:e].astype(jnp.int32)
    if grouped.resolve_grouped_matmul(grouped_matmul) == "blocked":
        # one loop over experts, each window of rows through the expert's whole MLP
        p = {n: jnp.asarray(v, dtype) for n, v in params.items()}
        index = (lambda i: i) if slot_of is None else (lambda i: slot_of[i])
        return grouped.blocked_map(xs, group_sizes,
                                   lambda i: _expert_fn(p, index(i), activation),
                                   p["w_down"].shape[-1], e)
    if slot_of is not None:
        params = {n: v[slot_of] for n, v in params.items()}
    sorted_ids = jnp.minimum(sorted_key, e - 1)

    def mm(a, w, b=None):
        y = grouped.grouped_matmul(a, params[w].astype(dtype), group_sizes, grouped_matmul)
        return y if b is None else y + params[b].astype(dtype)[sorted_ids]

    bias = "b_up" in params
    up = mm(xs, "w_up", "b_up" if bias else None)
    gate = mm(xs, "w_gate", "b_gate" if bias else None) if activation == "swiglu" else None
    return mm(_hidden(params, activation, up, gate), "w_down", "b_down" if bias else None)


def _expert_fn(p: dict, e, activation: str):
    """The MLP of expert e as a function of a window of rows (weights sliced once)."""
    w = {k: v[e] for k, v in p.items()}

    def mlp(xb):
        up = xb @ w["w_up"] + w.get("b_up", 0)
        gate = xb @ w["w_gate"] + w.get("b_gate", 0) if activation == "swiglu" else None
        return _hidden(p, activation, up, gate) @ w["w_down"] + w.get("b_down", 0)
    return mlp


def dispatch_combine(routing: Routing):
    """One-hot dispatch (G, S, E, C) and weighted combine (G, S, E, C) tensors."""
    e, c = routing.num_experts, routing.capacity
    expert = jax.nn.one_hot(routing.expert_ids, e, dtype=jnp.float32)       # (G, S, K, E)
    slot = jax.nn.one_hot(routing.position, c, dtype=jnp.float32)           # (G, S, K, C)
    kept = routing.kept.astype(jnp.float32)[..., None, None]
    pair = expert[..., :, None] * slot[..., None, :] * kept                  # (G, S, K, E, C)
    dispatch = jnp.sum(pair, axis=2)
    combine = jnp.sum(pair * routing.weights[..., None, None], axis=2)
    return dispatch, combine


def experts_dense(params: dict, x, routing: Routing, activation: str, dtype=jnp.float32):
    """x (G, S, D) -> (G, S, D) via GShard dispatch / combine einsums."""
    dispatch, combine = dispatch_combine(routing)
    xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), x.astype(dtype))
    ye = experts_buffers(params, xe, activation, dtype)
    return jnp.einsum("gsec,egcd->gsd", combine.astype(dtype), ye)


def experts_buffers(params: dict, xe, activation: str, dtype=jnp.float32):
    """Each expert on its buffer: xe (E, G, C, D) -> (E, G, C, Dout) (the GShard expert step;
    also each shard's local experts under expert parallelism, moex.nn.parallel)."""
    def mm(a, w, b=None):
        y = jnp.einsum("egcd,edf->egcf", a, params[w].astype(dtype))
        return y if b is None else y + params[b].astype(dtype)[:, None, None, :]

    bias = "b_up" in params
    up = mm(xe, "w_up", "b_up" if bias else None)
    gate = mm(xe, "w_gate", "b_gate" if bias else None) if activation == "swiglu" else None
    return mm(_hidden(params, activation, up, gate), "w_down", "b_down" if bias else None)


def experts_loop(params: dict, x, routing: Routing, activation: str):
    """Reference: for each expert, run its kept tokens through it and add weight * output."""
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    x = np.asarray(x, np.float32)
    ids, kept = np.asarray(routing.expert_ids), np.asarray(routing.kept)
    weights = np.asarray(routing.weights, np.float32)
    act = lambda a: np.asarray(activation_fn("swiglu" if activation == "swiglu" else activation)(a))
    out = np.zeros(x.shape[:-1] + (p["w_down"].shape[-1],), np.float32)
    for e in range(p["w_up"].shape[0]):
        gi, si, ki = np.nonzero((ids == e) & kept)
        if len(gi) == 0:
            continue
        xt = x[gi, si]
        up = xt @ p["w_up"][e] + (p["b_up"][e] if "b_up" in p else 0)
        if activation == "swiglu":
            gate = xt @ p["w_gate"][e] + (p["b_gate"][e] if "b_gate" in p else 0)
            h = act(gate) * up
        else:
            h = act(up)
        y = h @ p["w_down"][e] + (p["b_down"][e] if "b_down" in p else 0)
        np.add.at(out, (gi, si), y * weights[gi, si, ki][:, None])
    return out


def experts_all(params: dict, x, activation: str, dtype=jnp.float32, shared_input: bool = False):
    """Every expert on its own rows: x (E, N, D) -> (E, N, D); shared_input: x (N, D) for all E.

    Used by Soft MoE (each expert on its slots) and the causal soft decoder (all experts, every token).
    """
    spec = "nd,edf->enf" if shared_input else "end,edf->enf"
    x = x.astype(dtype)

    def mm(a, w, b, s):
        y = jnp.einsum(s, a, params[w].astype(dtype))
        return y if b not in params else y + params[b].astype(dtype)[:, None, :]

    up = mm(x, "w_up", "b_up", spec)
    gate = mm(x, "w_gate", "b_gate", spec) if activation == "swiglu" else None
    return mm(_hidden(params, activation, up, gate), "w_down", "b_down", "enf,efd->end")


def experts_soft_gated(params: dict, x, gates, activation: str, dtype=jnp.float32):
    """sum_e gates[n, e] * expert_e(x[n]) for x (N, D), gates (N, E) -> (N, Dout).

    Params in the expert-inner layout of the causal soft block: w_up / w_gate (D, E, F),
    w_down (E, F, Dout), so all experts run as one (D, E*F) matmul, the gates fold into the hidden
    activations, and one (E*F, Dout) matmul sums over experts -- no weight is copied per call.
    Reference: `experts_all` on the (E, D, F) transpose + a weighted sum.
    """
    n, d = x.shape
    _, e, f = params["w_up"].shape
    x = x.astype(dtype)

    def up_proj(w, b):
        y = x @ params[w].astype(dtype).reshape(d, e * f)
        if b in params:
            y = y + params[b].astype(dtype).reshape(e * f)
        return y.reshape(n, e, f)

    gate = up_proj("w_gate", "b_gate") if activation == "swiglu" else None
    h = _hidden(params, activation, up_proj("w_up", "b_up"), gate) * gates.astype(dtype)[:, :, None]
    y = h.reshape(n, e * f) @ params["w_down"].astype(dtype).reshape(e * f, -1)
    if "b_down" in params:
        y = y + gates.astype(dtype) @ params["b_down"].astype(dtype)
    return y


def init_expert_params(module, num_experts: int, d: int, f: int, activation: str,
                       use_bias: bool, param_dtype, out_dim: int | None = None,
                       expert_inner: bool = False) -> dict:
    """Declare stacked expert params on a flax module (called inside its compact __call__).

    w_up / w_gate are (E, D, F), or (D, E, F) with expert_inner (the layout of
    `experts_soft_gated`); w_down is (E, F, Dout) in both."""
    import flax.linen as nn
    out = out_dim or d
    init_out = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
    if expert_inner:
        init_in, in_shape = (nn.initializers.lecun_normal(in_axis=0, out_axis=2, batch_axis=1),
                             (d, num_experts, f))
        in_axes = ("embed", "experts", "mlp")
    else:
        init_in, in_shape = init_out, (num_experts, d, f)
        in_axes = ("experts", "embed", "mlp")
    params = {"w_up": param(module, "w_up", init_in, in_shape, param_dtype, in_axes)}
    if activation == "swiglu":
        params["w_gate"] = param(module, "w_gate", init_in, in_shape, param_dtype, in_axes)
    params["w_down"] = param(module, "w_down", init_out, (num_experts, f, out), param_dtype,
                             ("experts", "mlp", "embed"))
    if use_bias:
        z = nn.initializers.zeros
        params["b_up"] = param(module, "b_up", z, (num_experts, f), param_dtype,
                               ("experts", "mlp"))
        if activation == "swiglu":
            params["b_gate"] = param(module, "b_gate", z, (num_experts, f), param_dtype,
                                     ("experts", "mlp"))
        params["b_down"] = param(module, "b_down", z, (num_experts, out), param_dtype,
                                 ("experts", "embed"))
    return params
