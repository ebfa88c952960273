"""Quantized expert weights for host storage and transfer: int8 per output channel, int4 in groups.

    fmt = parse_expert_dtype("int4")        QuantFormat("int4")  groups of 64 (or the largest even
                                            divisor of the input width below it); "int4:32": 32
    stored = quantize_expert(weights, fmt)  one expert's {name: host array} in the stored layout
    weights = dequantize_expert(stored, fmt, dtype)      on the device, after the copy (jittable)
    params = quantized_params(params, layers, E, fmt)    the model with every routed expert
                                                         replaced by dequantize(quantize(w))

Shape letters: I input width of a matrix (D for w_gate / w_up, F for w_down), O output width, G
group size (int4), I/G groups.

Numerics are qwix's (JAX's quantization library): `qwix.quantize` with absmax calibration,
symmetric, round to nearest -- int8 with one scale per output channel (`channelwise_axes` the
output axis: scale (1, O)), int4 with one scale per output channel and group of G inputs
(`tiled_axes` {input axis: G}: scale (I/G, O)) -- and `qwix.dequantize` (q x scale in the weight's
own dtype). Error bound per element: |w - dequantize(quantize(w))| <= scale / 2, scale = absmax
of the element's channel (int8) or group (int4) / qmax (qwix's symmetric bounds: 127.5 for int8,
7.5 for int4), plus the rounding of the multiply in the weight's dtype.

What moex adds is the byte layout. qwix keeps int4 values one per byte (ml_dtypes int4, in numpy
and in host memory), so copying them would move 1 byte per weight; the store packs two int4
values into one uint8 (input rows 2i and 2i + 1: low and high nibble) and the device unpacks them
after the copy. An int4 expert then moves I x O / 2 bytes per matrix plus its scales (in the weight's
dtype): at G = 64, 3.76x fewer than bf16 and 7.1x fewer than fp32 (`stored_bytes`); int8 moves
~2x fewer than bf16 and ~4x fewer than fp32. Biases stay in the weight dtype.

Matrices are the routed expert weights `w_gate`, `w_up`, `w_down` (I, O); the stored entry of a
matrix `w` is `w` (int8 values or packed int4) and `w.scale`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix

MATRICES = ("w_gate", "w_up", "w_down")
FORMATS = ("int8", "int4")
DEFAULT_GROUP = 64
NATIVE = ("native", "none", "fp", "full")       # names of the unquantized store


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    kind: str                      # "int8" | "int4"
    group: int | None = None       # int4: inputs per scale; None: the largest even divisor of
                                   # the matrix's input width up to DEFAULT_GROUP

    def __post_init__(self):
        if self.kind not in FORMATS:
            raise ValueError(f"expert dtype {self.kind!r}: expected one of {', '.join(FORMATS)}")
        if self.group is not None and (self.group < 2 or self.group % 2):
            raise ValueError(f"int4 group size must be even and >= 2, found {self.group}")

    @property
    def label(self) -> str:
        if self.kind == "int4" and self.group is not None:
            return f"int4:{self.group}"
        return self.kind

    def __str__(self) -> str:
        return self.label

    def group_for(self, inputs: int) -> int:
        """The group size used on a matrix of `inputs` rows (whole, even groups only)."""
        if self.group is None:
            g = next((g for g in range(min(DEFAULT_GROUP, inputs), 1, -1)
                      if inputs % g == 0 and g % 2 == 0), 0)
            if not g:
                raise ValueError(f"int4 packs pairs of input rows; a matrix with {inputs} input "
                                 "rows has no even group size")
            return g
        g = min(self.group, inputs)
        if inputs % g or g % 2:
            raise ValueError(f"int4 with groups of {self.group}: a matrix with {inputs} input "
                             f"rows does not split into even groups of {g}; choose a group size "
                             f"that divides {inputs} (int4:G)")
        return g


def parse_expert_dtype(text) -> QuantFormat | None:
    """'native' (or None) -> None: experts stored as the params are; 'int8'; 'int4'; 'int4:G'."""
    if text is None or isinstance(text, QuantFormat):
        return text
    s = str(text).strip().lower()
    if s in NATIVE:
        return None
    kind, sep, group = s.partition(":")
    if kind not in FORMATS or (sep and (kind != "int4" or not group.isdigit())):
        raise ValueError(f"expert dtype {text!r}: expected native, int8, int4 or int4:G (G the "
                         "group size, e.g. int4:32)")
    return QuantFormat(kind, int(group)) if sep else QuantFormat(kind)


def label(fmt: QuantFormat | None) -> str:
    return "native" if fmt is None else fmt.label


# -- one matrix ---------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w, kind: str, group: int):
    how = {"channelwise_axes": (1,)}
    if kind == "int4":
        how["tiled_axes"] = {0: group}
    q = qwix.quantize(w, kind, **how)
    return q.qvalue.astype(jnp.int8), q.scale


def quantize_matrix(w, fmt: QuantFormat) -> tuple[np.ndarray, np.ndarray]:
    """(I, O) -> (stored values, scale) as host numpy arrays: int8 (I, O) and (1, O), or int4
    packed uint8 (I/2, O) and (I/G, O)."""
    if w.ndim != 2:
        raise ValueError(f"quantize_matrix takes an (inputs, outputs) matrix, found shape "
                         f"{tuple(w.shape)}")
    group = fmt.group_for(w.shape[0]) if fmt.kind == "int4" else 0
    q, scale = (np.asarray(a) for a in _quantize(jnp.asarray(w), fmt.kind, group))
    if fmt.kind == "int4":
        q = pack_int4(q)
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """(I, O) int8 values in [-8, 7] -> (I/2, O) uint8: row 2i in the low nibble, 2i+1 high."""
    if q.shape[0] % 2:
        raise ValueError(f"int4 packing pairs input rows; found {q.shape[0]} rows")
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError(f"int4 values must lie in [-8, 7], found [{q.min()}, {q.max()}]")
    u = q.astype(np.uint8) & 0xF
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed):
    """(I/2, O) uint8 -> (I, O) int8 (jnp; the inverse of pack_int4)."""
    p = packed.astype(jnp.int8)
    low = ((p & 0xF) ^ 8) - 8                     # sign-extend a nibble
    high = (((p >> 4) & 0xF) ^ 8) - 8
    return jnp.stack([low, high], axis=1).reshape((-1,) + packed.shape[1:])


def dequantize_matrix(q, scale, fmt: QuantFormat):
    """Stored (values, scale) -> the (I, O) matrix in the scale's dtype, by qwix.dequantize."""
    if fmt.kind == "int4":
        q = unpack_int4(q).astype(jnp.int4)
    return qwix.dequantize(qwix.QArray(qvalue=q, scale=scale, zero_point=None, qtype=fmt.kind))


# -- one expert ---------------------------------------------------------------------------------
def quantize_expert(weights: dict, fmt: QuantFormat) -> dict:
    """One expert's {name: (I, O) or bias array} -> its stored entry: each matrix as values and
    `name.scale`, biases unchanged (host numpy arrays)."""
    out = {}
    for name, w in weights.items():
        if name in MATRICES:
            out[name], out[f"{name}.scale"] = quantize_matrix(w, fmt)
        else:
            out[name] = np.asarray(w)
    return out


def dequantize_expert(stored: dict, fmt: QuantFormat, dtype) -> dict:
    """A stored entry -> {name: array in `dtype`} (jittable; `fmt` and `dtype` static)."""
    return {name: (dequantize_matrix(a, stored[f"{name}.scale"], fmt) if name in MATRICES
                   else a).astype(dtype)
            for name, a in stored.items() if not name.endswith(".scale")}


@functools.partial(jax.jit, static_argnums=(1, 2))
def dequantize_expert_jit(stored: dict, fmt: QuantFormat, dtype: str) -> dict:
    return dequantize_expert(stored, fmt, jnp.dtype(dtype))


def stored_bytes(stored: dict) -> int:
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in stored.values()))


def stored_size(shapes: dict, fmt: QuantFormat | None, item: int) -> int:
    """Bytes of one expert's stored copy from its weights' shapes {name: shape} of `item`-byte
    elements (what `stored_bytes` of `quantize_expert` gives, without the arrays: the
    performance model's sizes of large experts)."""
    total = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if fmt is None or name not in MATRICES:
            total += size * item
        elif fmt.kind == "int8":
            total += size + shape[1] * item
        else:
            total += size // 2 + shape[0] // fmt.group_for(shape[0]) * shape[1] * item
    return total


def roundtrip_expert(weights: dict, fmt: QuantFormat) -> dict:
    """dequantize(quantize(weights)) computed as the slot pool does it (the same jitted
    function), so a model built from it is bitwise the model the engine runs."""
    dtype = str(np.dtype(next(iter(weights.values())).dtype))
    return {n: np.asarray(a) for n, a in
            dequantize_expert_jit(quantize_expert(weights, fmt), fmt, dtype).items()}


def quantized_params(params, layers: list[int], num_experts: int, fmt: QuantFormat | None,
                     keep: frozenset = frozenset()):
    """The params with each routed expert of decoder `layers` replaced by its int8 / int4 round
    trip, except the (layer, expert) keys in `keep` (left at full precision: the mixed model).
    fmt None returns params unchanged."""
    if fmt is None:
        return params
    out = dict(params)
    out["decoder"] = dict(params["decoder"])
    for i in layers:
        name = f"layer_{i}"
        layer = dict(params["decoder"][name])
        ffn = dict(layer["ffn"])
        experts = {w: np.array(a) for w, a in ffn["experts"].items()}
        for e in range(num_experts):
            if (i, e) in keep:
                continue
            for w, a in roundtrip_expert({w: a[e] for w, a in experts.items()}, fmt).items():
                experts[w][e] = a
        ffn["experts"] = {w: jnp.asarray(a) for w, a in experts.items()}
        layer["ffn"] = ffn
        out["decoder"][name] = layer
    return out
