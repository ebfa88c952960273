"""Declarative key mapping: one Rule per moex param (or group of params), used in both directions.

A Rule names moex paths ('decoder/layer_0/attn/q'), HF keys ('model.layers.0.self_attn.q_proj.weight')
and a Transform. `Transform.to_moex(load, keys)` reads HF tensors through `load(key)` (one at a time)
and returns the moex arrays; `Transform.to_hf(arrays)` inverts it exactly (only transposes and
reshapes), so HF -> moex -> HF is bit-exact.

HF `nn.Linear` weights are (out, in); moex kernels are (in, out), attention projections
(D, heads, head_dim) and (heads, head_dim, D), stacked experts (E, in, out).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_moex: Callable   # (load, keys) -> list of arrays, one per moex path
    to_hf: Callable     # list of moex arrays -> list of arrays, one per HF key


@dataclasses.dataclass(frozen=True)
class Rule:
    moex: tuple[str, ...]
    hf: tuple[str, ...]
    transform: Transform


def copy() -> Transform:
    return Transform("copy", lambda load, keys: [load(keys[0])], lambda a: [a[0]])


def linear() -> Transform:
    """(out, in) <-> (in, out)."""
    return Transform("linear", lambda load, keys: [np.ascontiguousarray(load(keys[0]).T)],
                     lambda a: [np.ascontiguousarray(a[0].T)])


def heads_in(heads: int) -> Transform:
    """q/k/v: (H*Dh, D) <-> (D, H, Dh)."""
    def fwd(load, keys):
        w = load(keys[0])
        return [np.ascontiguousarray(w.T).reshape(w.shape[1], heads, -1)]
    return Transform("heads_in", fwd,
                     lambda a: [np.ascontiguousarray(a[0].reshape(a[0].shape[0], -1).T)])


def heads_out(heads: int) -> Transform:
    """o: (D, H*Dh) <-> (H, Dh, D)."""
    def fwd(load, keys):
        w = load(keys[0])
        return [np.ascontiguousarray(w.T).reshape(heads, -1, w.shape[0])]
    return Transform("heads_out", fwd,
                     lambda a: [np.ascontiguousarray(a[0].reshape(-1, a[0].shape[-1]).T)])


def bias_heads(heads: int) -> Transform:
    """(H*Dh,) <-> (H, Dh)."""
    return Transform("bias_heads", lambda load, keys: [load(keys[0]).reshape(heads, -1)],
                     lambda a: [a[0].reshape(-1)])


def stacked_linear() -> Transform:
    """E per-expert (out, in) tensors <-> one (E, in, out), filled one expert at a time."""
    def fwd(load, keys):
        out = None
        for e, k in enumerate(keys):
            w = load(k)
            if out is None:
                out = np.empty((len(keys), w.shape[1], w.shape[0]), w.dtype)
            out[e] = w.T
        return [out]
    return Transform("stacked_linear", fwd,
                     lambda a: [np.ascontiguousarray(a[0][e].T) for e in range(a[0].shape[0])])


def fused_gate_up() -> Transform:
    """(E, 2F, D) gate half first <-> w_gate (E, D, F), w_up (E, D, F)."""
    def fwd(load, keys):
        gu = load(keys[0])
        f = gu.shape[1] // 2
        return [np.ascontiguousarray(gu[:, :f].transpose(0, 2, 1)),
                np.ascontiguousarray(gu[:, f:].transpose(0, 2, 1))]
    return Transform("fused_gate_up", fwd, lambda a: [np.ascontiguousarray(
        np.concatenate([a[0], a[1]], axis=2).transpose(0, 2, 1))])


def fused_down() -> Transform:
    """(E, D, F) <-> (E, F, D)."""
    return Transform("fused_down",
                     lambda load, keys: [np.ascontiguousarray(load(keys[0]).transpose(0, 2, 1))],
                     lambda a: [np.ascontiguousarray(a[0].transpose(0, 2, 1))])


def patch_conv(patch: int, channels: int) -> Transform:
    """Conv (D, C, P, P) <-> kernel (P*P*C, D) over patches flattened as (py, px, c)."""
    def fwd(load, keys):
        w = load(keys[0])
        return [np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(-1, w.shape[0])]
    return Transform("patch_conv", fwd, lambda a: [np.ascontiguousarray(
        a[0].reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1))])
