"""Host-resident experts and the device slot pool they stream into.

Shape letters: L_moe MoE layers, E experts per layer, S device slots, D width, F expert width.

  ExpertStore  every routed expert of the decoder's hard-MoE layers, one host array per
               (layer, expert, weight), in `pinned_host` memory (`unpinned_host` where the backend
               has no pinned memory; `memory_kind` says which). Everything else stays on the device
               (`dense_params`, with the experts removed). Experts are stored as the params are
               (`fmt` None) or quantized (`fmt` int8 / int4, `moex.offload.quant`), and may carry a
               second, low-precision copy (`low_fmt`) for low-precision misses. Sizes:
               `expert_bytes` one expert as a device slot holds it (the weights' own dtype: the
               unit of the budget), `stored_bytes` one expert as a load moves it, `low_bytes` its
               low-precision copy.
  SlotPool     S expert slots preallocated on the device, per weight an (S, ...) array. Loading an
               expert is an async `jax.device_put` of its host arrays plus an in-place (donated)
               slot update compiled once -- for a quantized copy the update dequantizes it on the
               device. `slot_table(layer)` maps that layer's experts to slots (-1: not resident);
               expert compute reads weights through it (`moex.nn.experts.pair_outputs(...,
               slot_of=...)`), so cache changes never recompile. `precision(key)` says which copy
               a resident expert came from.

Two slot forms for a quantized store: `dequantized` (the default) slots hold the weights in
their own dtype, dequantized once by the slot update, so a quantized store moves fewer bytes at
the same slot count; `quantized` slots hold the stored copy itself (values + scales) and the
expert compute dequantizes the layer's slots at every use (`LayerPieces.pairs_quantized`), so
the same budget holds expert_bytes / stored_bytes times more experts (as mixtral-offloading keeps
its HQQ experts on the GPU). The pool never holds more than its byte budget: S = floor(budget /
slot bytes), slot bytes = expert_bytes or stored_bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from moex.config import EncDecConfig, MoEConfig, VLMConfig
from moex.offload import quant
from moex.offload.quant import QuantFormat
from moex.offload.spec import budget_slots

WEIGHTS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def host_memory_kind(device) -> str:
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" in kinds:
        return "pinned_host"
    if "unpinned_host" in kinds:
        return "unpinned_host"
    raise RuntimeError(f"{device} offers no host memory kind (has {sorted(kinds)}); "
                       "expert offloading needs pinned_host or unpinned_host")


def moe_layers(cfg: VLMConfig | EncDecConfig) -> list[int]:
    """The layers whose FFN is a hard MoE (the ones whose experts are offloaded): decoder layer
    indices; for an encoder-decoder, global ids (encoder block i -> i, decoder block j ->
    encoder_layers + j), the encoder's first."""
    if isinstance(cfg, EncDecConfig):
        return [i if stack == "encoder" else cfg.encoder_layers + i
                for stack, i in cfg.moe_layers()]
    moe = cfg.decoder.moe
    if moe.kind != "hard":
        return []
    return [i for i in range(cfg.decoder.num_layers) if moe.is_moe_layer(i)]


def expert_moe(cfg: VLMConfig | EncDecConfig) -> MoEConfig:
    """The MoEConfig of the offloaded experts (an encoder-decoder's two stacks must agree on
    the experts' count, top-k and width: one slot shape serves both)."""
    if not isinstance(cfg, EncDecConfig):
        return cfg.decoder.moe
    enc, dec = cfg.encoder_moe, cfg.decoder_moe
    if enc.kind == "hard" and dec.kind == "hard" and \
            (enc.num_experts, enc.top_k, enc.expert_dim) != (dec.num_experts, dec.top_k,
                                                            dec.expert_dim):
        raise ValueError(f"{cfg.name}: the encoder's and decoder's experts differ in count, "
                         "top-k or width; the offload engine holds one expert shape")
    return enc if enc.kind == "hard" else dec


def expert_site(cfg: VLMConfig | EncDecConfig, layer: int) -> tuple[str, str]:
    """(stack, block) of the params that hold MoE layer `layer`'s experts."""
    if isinstance(cfg, EncDecConfig) and layer < cfg.encoder_layers:
        return "encoder", f"layer_{layer}"
    if isinstance(cfg, EncDecConfig):
        return "decoder", f"layer_{layer - cfg.encoder_layers}"
    return "decoder", f"layer_{layer}"


@dataclasses.dataclass
class ExpertStore:
    cfg: VLMConfig
    layers: list[int]                       # decoder layer index of each MoE layer
    host: dict                              # (layer, expert) -> {weight: host array}
    dense_params: dict                      # params without the routed experts of `layers`
    memory_kind: str
    expert_bytes: int                       # bytes of one expert in a device slot
    shapes: dict                            # weight -> (shape of one expert, dtype)
    fmt: QuantFormat | None = None          # the stored copy: None (as the params) or int8/int4
    stored_bytes: int = 0                   # bytes one load moves (the stored copy)
    low: dict | None = None                 # (layer, expert) -> low-precision copy (host)
    low_fmt: QuantFormat | None = None
    low_bytes: int = 0
    _host_weights: dict = dataclasses.field(default_factory=dict, repr=False)
    _views: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_experts(self) -> int:
        return expert_moe(self.cfg).num_experts

    @property
    def total_bytes(self) -> int:
        """All experts as device slots hold them (what a budget fraction is a fraction of)."""
        return self.expert_bytes * len(self.host)

    @property
    def total_stored_bytes(self) -> int:
        return self.stored_bytes * len(self.host)

    @property
    def dtype(self):
        return self.shapes["w_down"][1]

    @property
    def stored_shapes(self) -> dict:
        """{name: (shape, dtype)} of one expert's stored copy."""
        return {w: (tuple(a.shape), np.dtype(a.dtype))
                for w, a in self.host[next(iter(self.host))].items()}

    def copy_of(self, key, low: bool = False) -> tuple[dict, QuantFormat | None, int]:
        """(host arrays, their format, bytes) of the copy a load of `key` moves."""
        if low:
            if self.low is None:
                raise ValueError(f"{self.cfg.name}: this store has no low-precision copies "
                                 "(build it with low_dtype='int4' or 'int8')")
            return self.low[key], self.low_fmt, self.low_bytes
        return self.host[key], self.fmt, self.stored_bytes

    def view_of(self, key, low: bool = False) -> dict:
        """The copy a load of `key` moves as numpy arrays sharing the host arrays' memory (on a
        CPU backend; made once per key)."""
        if (key, low) not in self._views:
            self._views[key, low] = {w: np.asarray(a) for w, a in
                                     self.copy_of(key, low)[0].items()}
        return self._views[key, low]

    def host_weights(self, layer: int, device) -> dict:
        """Layer `layer`'s experts stacked (E, ...) in the weights' dtype, committed to `device`
        (the host CPU device that computes missed experts): the stored copy, dequantized as the
        slot pool does, so host and device compute the same weights. Built once per layer."""
        if (layer, device) not in self._host_weights:
            per = []
            for e in range(self.num_experts):
                arrays = {w: np.asarray(a) for w, a in self.host[layer, e].items()}
                if self.fmt is not None:
                    arrays = {w: np.asarray(a) for w, a in quant.dequantize_expert_jit(
                        arrays, self.fmt, str(self.dtype)).items()}
                per.append(arrays)
            self._host_weights[layer, device] = {
                w: jax.device_put(np.stack([p[w] for p in per]), device) for w in per[0]}
        return self._host_weights[layer, device]

    @classmethod
    def from_params(cls, cfg: VLMConfig, params, device=None, expert_dtype=None,
                    low_dtype=None) -> "ExpertStore":
        """Move every routed expert to host memory one (layer, expert) at a time; expert_dtype
        'int8' / 'int4' / 'int4:G' stores them quantized, low_dtype adds a quantized copy for
        low-precision misses (both as in `moex.offload.quant.parse_expert_dtype`)."""
        fmt, low_fmt = quant.parse_expert_dtype(expert_dtype), quant.parse_expert_dtype(low_dtype)
        device = device or jax.devices()[0]
        kind = host_memory_kind(device)
        to_host = SingleDeviceSharding(device, memory_kind=kind)
        layers = moe_layers(cfg)
        if not layers:
            raise ValueError(f"{cfg.name} has no hard-MoE layers to offload")
        dense = {k: v for k, v in params.items()}
        for stack in {expert_site(cfg, i)[0] for i in layers}:
            dense[stack] = dict(params[stack])
        host, low, shapes = {}, {}, {}
        for i in layers:
            stack, name = expert_site(cfg, i)
            layer = dict(params[stack][name])
            ffn = dict(layer["ffn"])
            experts = ffn.pop("experts")
            for e in range(expert_moe(cfg).num_experts):
                weights = {w: np.asarray(a[e]) for w, a in experts.items()}
                host[i, e] = _to_host(weights if fmt is None
                                      else quant.quantize_expert(weights, fmt), to_host)
                if low_fmt is not None:
                    low[i, e] = _to_host(quant.quantize_expert(weights, low_fmt), to_host)
            shapes = {w: (tuple(a.shape[1:]), np.dtype(a.dtype)) for w, a in experts.items()}
            layer["ffn"] = ffn
            dense[stack][name] = layer
        expert_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in shapes.values())
        first = next(iter(host))
        return cls(cfg, layers, host, dense, kind, expert_bytes, shapes, fmt,
                   quant.stored_bytes(host[first]), low if low_fmt else None, low_fmt,
                   quant.stored_bytes(low[first]) if low_fmt else 0)


def _to_host(arrays: dict, to_host) -> dict:
    return {w: jax.device_put(a, to_host) for w, a in arrays.items()}


class SlotPool:
    """S device slots for experts; loads by async device_put + in-place slot update.

    Public state: `arrays` (weight -> (S, ...) device array), `num_slots`, `budget_bytes`,
    `device` and `sharding` (where the slots live), and the counters `loads`, `low_loads` and
    `bytes_loaded` (bytes moved host -> device: each load's stored size). Which expert sits in
    which slot is private: ask `is_resident`, `resident`, `first_free_slot`, `slot_of`,
    `precision` and `slot_table`, and change it with `load` and `free`.
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, device=None,
                 quantized: bool = False):
        """quantized: slots hold the store's quantized copies (see the module docstring)."""
        self.store, self.quantized = store, quantized
        if quantized and (store.fmt is None or store.low is not None):
            raise ValueError("quantized slots hold the store's int8 / int4 copies: build the "
                             "store with expert_dtype int8 or int4 and no low-precision copy "
                             f"(found expert dtype {quant.label(store.fmt)}, low copy "
                             f"{quant.label(store.low_fmt) if store.low is not None else 'none'})")
        self.slot_bytes = store.stored_bytes if quantized else store.expert_bytes
        self.num_slots = budget_slots(budget_bytes, self.slot_bytes)
        if self.num_slots < 1:
            raise ValueError(f"expert budget {budget_bytes} B holds no expert; one expert of "
                             f"{store.cfg.name} is {self.slot_bytes} B in a slot")
        self.budget_bytes = budget_bytes
        self.device = device or jax.devices()[0]
        self.sharding = SingleDeviceSharding(self.device, memory_kind="device")
        shapes = store.stored_shapes if quantized else store.shapes
        self.arrays = {w: jax.device_put(jnp.zeros((self.num_slots,) + s, d), self.sharding)
                       for w, (s, d) in shapes.items()}
        self._owner: list[tuple[int, int] | None] = [None] * self.num_slots   # slot -> key
        self._slot_of: dict[tuple[int, int], int] = {}                        # key -> slot
        self._low: set = set()                                                # low-precision
        self._row = {layer: i for i, layer in enumerate(store.layers)}
        self._table = np.full((len(store.layers), store.num_experts), -1, np.int32)
        # the table the device reads: like _table, except that a freed expert keeps its entry
        # until its slot is written again (its weights are still there, so reading them is
        # right); it changes only with the slot writes, in the same jitted update, so every
        # version of `arrays` comes with the table that describes it
        self._lazy = self._table.copy()
        self._physical: list = [None] * self.num_slots   # slot -> key whose weights it holds
        self._device_table = jax.device_put(self._lazy.copy(), self.sharding)
        self.bytes_loaded = 0
        self.loads = 0
        self.low_loads = 0
        self._update = jax.jit(_set_slots, donate_argnums=0, static_argnums=(3, 4))
        # on a CPU device host and device memory are the same RAM: the update reads the
        # store's arrays in place (numpy views), so writing the slot is the only copy; elsewhere
        # an async device_put stages each copy first (a DMA from pinned host memory)
        self._in_place = self.device.platform == "cpu"

    @property
    def pool_bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.arrays.values())

    def is_resident(self, key: tuple[int, int]) -> bool:
        return key in self._slot_of

    def resident(self) -> frozenset:
        """The (layer, expert) keys in the pool."""
        return frozenset(self._slot_of)

    def slot_of(self, key: tuple[int, int]) -> int | None:
        return self._slot_of.get(key)

    def precision(self, key: tuple[int, int]) -> str:
        """'low' (its low-precision copy) or 'stored' (the store's own copy)."""
        if key not in self._slot_of:
            raise KeyError(f"expert {key} is not in the pool")
        return "low" if key in self._low else "stored"

    def first_free_slot(self) -> int | None:
        """The lowest slot that holds no expert, or None when the pool is full."""
        return next((s for s, key in enumerate(self._owner) if key is None), None)

    def free(self, key: tuple[int, int]) -> None:
        """Expert `key` leaves the pool: its slot is free (its weights stay until overwritten)."""
        if key not in self._slot_of:
            raise KeyError(f"expert {key} is not in the pool (resident: {sorted(self._slot_of)})")
        self._owner[self._slot_of.pop(key)] = None
        self._low.discard(key)
        self._table[self._row[key[0]], key[1]] = -1

    def load(self, key: tuple[int, int], slot: int | None = None, low: bool = False,
             count: bool = True) -> dict:
        """Copy expert `key` = (layer, expert) into `slot` (default: the first free one),
        replacing whatever was there (if key was resident in another slot, that slot is freed);
        `low`: its low-precision copy (an upgrade loads the stored copy into the same slot);
        `count`: add it to `loads` and `bytes_loaded` (not when preloading).
        Returns a device scalar, ready once the (async) copy has landed: block on it to wait."""
        return self.load_many([(key, slot, low)], count)[0]

    def load_many(self, requests, count: bool = True) -> list[dict]:
        """`load` for each (key, slot or None, low) in order, the copies issued together: per
        copy format, slot updates of power-of-two widths (5 copies: one update of 4 and one of
        1), so few widths compile and every copy is made once. Returns for each request a
        device array that is ready once its copy has landed in its slot."""
        claimed = [(key, self._claim(key, slot, low), low) for key, slot, low in requests]
        ready = [None] * len(claimed)
        for low in (False, True):
            mine = [i for i, c in enumerate(claimed) if c[2] == low]
            while mine:
                width = 1 << (len(mine).bit_length() - 1)       # the largest power of two
                chunk, mine = mine[:width], mine[width:]
                done = self._write([claimed[i][0] for i in chunk],
                                   [claimed[i][1] for i in chunk], low, count)
                for i in chunk:
                    ready[i] = done
        if self.pool_bytes > self.budget_bytes:
            raise AssertionError(f"pool holds {self.pool_bytes} B, over its budget of "
                                 f"{self.budget_bytes} B")
        return ready

    def _write(self, keys: list, slots: list, low: bool, count: bool):
        """One slot update: expert keys[i]'s copy (its low-precision one with `low`) into
        slots[i]. Returns a device array ready once the copies have landed."""
        copies = [self.store.copy_of(key, low) for key in keys]
        if self._in_place:
            arrays = [self.store.view_of(key, low) for key in keys]
        else:
            arrays = jax.device_put([c[0] for c in copies], self.sharding)     # async
        self.arrays, self._device_table, done = self._update(
            self.arrays, np.asarray(slots, np.int32), arrays,
            None if self.quantized else copies[0][1], str(self.store.dtype), self._lazy.copy())
        if count:
            self.bytes_loaded += sum(c[2] for c in copies)
            self.loads += len(keys)
            self.low_loads += len(keys) * low
        return done

    def _claim(self, key: tuple[int, int], slot: int | None, low: bool) -> int:
        """Slot bookkeeping of a load: key owns `slot` (or the first free one) from now on."""
        if slot is None:
            slot = self.first_free_slot()
            if slot is None:
                raise ValueError(f"no free slot for {key}: all {self.num_slots} slots hold "
                                 "experts; free one first (free(key))")
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside the pool of {self.num_slots}")
        if key not in self.store.host:
            raise KeyError(f"no expert {key} in the store (MoE layers {self.store.layers}, "
                           f"{self.store.num_experts} experts)")
        if key in self._slot_of:
            self.free(key)
        old = self._owner[slot]
        if old is not None:
            self.free(old)
        self._owner[slot] = key
        self._slot_of[key] = slot
        self._table[self._row[key[0]], key[1]] = slot
        gone = self._physical[slot]
        if gone is not None and self._lazy[self._row[gone[0]], gone[1]] == slot:
            self._lazy[self._row[gone[0]], gone[1]] = -1      # its slot is about to be written
        self._physical[slot] = key
        self._lazy[self._row[key[0]], key[1]] = slot
        if low:
            self._low.add(key)
        return slot

    def slot_table(self, layer: int) -> np.ndarray:
        """(E,) int32: the slot of each expert of `layer`, -1 if not resident."""
        return self._table[self._row[layer]].copy()

    def row(self, layer: int) -> int:
        """The row of MoE layer `layer` in `device_table`."""
        return self._row[layer]

    def device_table(self):
        """(L_moe, E) int32 on the pool's device: the expert -> slot table to be read together
        with `arrays` as of now (-1: the expert's weights are in no slot). The jitted update
        that writes slots also writes this table, so the two always come from the same call: a
        piece given both never reads a slot through an entry for weights that slot no longer
        holds, and a slot whose copy is in flight is read only after the copy lands (the
        version of `arrays` that holds it depends on the copy). A freed expert keeps its entry
        until its slot is written again (its weights are still there); residency -- what the
        engine and the cache core count as resident -- is `resident` / `slot_table`."""
        return self._device_table


def _set_slots(arrays: dict, slots, staged: list, fmt: QuantFormat | None, dtype: str,
               table):
    """Write expert staged[i] into slots[i], in order (in place: `arrays` is donated); a
    quantized copy is dequantized here, on the device. Returns (arrays, `table` -- the
    expert -> slot table after the writes -- on the device, an element of the last write:
    ready when the writes have landed)."""
    for i, one in enumerate(staged):
        if fmt is not None:
            one = quant.dequantize_expert(one, fmt, jnp.dtype(dtype))
        arrays = {w: jax.lax.dynamic_update_index_in_dim(a, one[w].astype(a.dtype), slots[i], 0)
                  for w, a in arrays.items()}
    last = next(iter(arrays.values()))[slots[-1]]
    return arrays, table, last.reshape(-1)[:1]
