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

from checkpoints_convert.hfconfig import CheckpointError


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
    alt: tuple["Rule", ...] = ()    # read instead when the files hold these and not `hf`
                                    # (another layout of the same params, e.g. per-expert)


def copy() -> Transform:
    return Transform("copy", lambda load, keys: [load(keys[0])], lambda a: [a[0]])


def same_tensor(n: int, why: str = "") -> Transform:
    """One moex array <-> the same tensor under n HF keys (copies a checkpoint keeps of one
    parameter); reading checks that they are equal, `why` ending the message when not."""
    def fwd(load, keys):
        first = load(keys[0])
        for k in keys[1:]:
            other = load(k)
            if other.shape != first.shape or not np.array_equal(other, first):
                raise CheckpointError(f"{k} differs from {keys[0]}; moex keeps one array for "
                                      f"both{': ' + why if why else ''}")
        return [first]
    return Transform("same_tensor", fwd, lambda a: [a[0]] + [a[0].copy() for _ in range(n - 1)])


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


def qkv_heads(heads: int) -> Transform:
    """One fused qkv projection (3*H*Dh, D) <-> q, k, v (D, H, Dh) (Qwen3-VL's vision tower)."""
    def fwd(load, keys):
        w = load(keys[0])
        return [np.ascontiguousarray(part.T).reshape(w.shape[1], heads, -1)
                for part in np.split(w, 3, axis=0)]
    return Transform("qkv_heads", fwd, lambda a: [np.ascontiguousarray(np.concatenate(
        [x.reshape(x.shape[0], -1).T for x in a], axis=0))])


def qkv_bias_heads(heads: int) -> Transform:
    """(3*H*Dh,) <-> q, k, v biases (H, Dh)."""
    return Transform("qkv_bias_heads",
                     lambda load, keys: [b.reshape(heads, -1) for b in np.split(load(keys[0]), 3)],
                     lambda a: [np.concatenate([x.reshape(-1) for x in a])])


def expert_gate_up(d: int, f: int, layout: str = "transformers") -> Transform:
    """Fused experts' gate_up_proj <-> w_gate, w_up (E, D, F), gate half first. Read in either
    layout, told apart by shape: (E, 2F, D) ("transformers": what transformers 5 keeps in memory
    and saves) or (E, D, 2F) ("hub": the published Qwen3-VL-MoE files); when both fit (D = 2F)
    it is read as transformers reads it. Written in `layout`."""
    def fwd(load, keys):
        w = load(keys[0])
        if w.shape[1:] == (2 * f, d):
            w = w.transpose(0, 2, 1)
        elif w.shape[1:] != (d, 2 * f):
            raise CheckpointError(f"{keys[0]}: expected (E, {2 * f}, {d}) or (E, {d}, {2 * f}), "
                             f"found {tuple(w.shape)}")
        return [np.ascontiguousarray(w[:, :, :f]), np.ascontiguousarray(w[:, :, f:])]

    def back(a):
        w = np.concatenate([a[0], a[1]], axis=2)
        return [np.ascontiguousarray(w.transpose(0, 2, 1) if layout == "transformers" else w)]
    return Transform("expert_gate_up", fwd, back)


def expert_down(d: int, f: int, layout: str = "transformers") -> Transform:
    """Fused experts' down_proj <-> w_down (E, F, D): stored (E, D, F) ("transformers") or
    (E, F, D) ("hub"), told apart by shape as in expert_gate_up."""
    def fwd(load, keys):
        w = load(keys[0])
        if w.shape[1:] == (d, f):
            w = w.transpose(0, 2, 1)
        elif w.shape[1:] != (f, d):
            raise CheckpointError(f"{keys[0]}: expected (E, {d}, {f}) or (E, {f}, {d}), "
                             f"found {tuple(w.shape)}")
        return [np.ascontiguousarray(w)]
    return Transform("expert_down", fwd, lambda a: [np.ascontiguousarray(
        a[0].transpose(0, 2, 1) if layout == "transformers" else a[0])])


def patch_conv3d(frames: int, patch: int, channels: int) -> Transform:
    """Conv3d (D, C, T, P, P) <-> kernel (T*P*P*C, D) over patches flattened as (t, py, px, c)."""
    def fwd(load, keys):
        w = load(keys[0])
        return [np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0)).reshape(-1, w.shape[0])]
    return Transform("patch_conv3d", fwd, lambda a: [np.ascontiguousarray(
        a[0].reshape(frames, patch, patch, channels, -1).transpose(4, 3, 0, 1, 2))])


def patch_conv(patch: int, channels: int) -> Transform:
    """Conv (D, C, P, P) <-> kernel (P*P*C, D) over patches flattened as (py, px, c)."""
    def fwd(load, keys):
        w = load(keys[0])
        return [np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(-1, w.shape[0])]
    return Transform("patch_conv", fwd, lambda a: [np.ascontiguousarray(
        a[0].reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1))])
