"""Host-resident experts and the device slot pool they stream into.

Shape letters: L_moe MoE layers, E experts per layer, S device slots, D width, F expert width.

  ExpertStore  every routed expert of the decoder's hard-MoE layers, one host array per
               (layer, expert, weight), in `pinned_host` memory (`unpinned_host` where the backend
               has no pinned memory; `memory_kind` says which). Everything else stays on the device
               (`dense_params`, with the experts removed).
  SlotPool     S expert slots preallocated on the device, per weight an (S, ...) array. Loading an
               expert is an async `jax.device_put` of its host arrays plus an in-place (donated)
               slot update compiled once. `slot_table(layer)` maps that layer's experts to slots
               (-1: not resident); expert compute reads weights through it
               (`moex.nn.experts.pair_outputs(..., slot_of=...)`), so cache changes never
               recompile.

The pool never holds more than its byte budget: S = floor(budget / bytes of one expert).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from moex.config import VLMConfig
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


def moe_layers(cfg: VLMConfig) -> list[int]:
    """Decoder layers whose FFN is a hard MoE (the ones whose experts are offloaded)."""
    moe = cfg.decoder.moe
    if moe.kind != "hard":
        return []
    return [i for i in range(cfg.decoder.num_layers) if moe.is_moe_layer(i)]


@dataclasses.dataclass
class ExpertStore:
    cfg: VLMConfig
    layers: list[int]                       # decoder layer index of each MoE layer
    host: dict                              # (layer, expert) -> {weight: host array}
    dense_params: dict                      # params without the routed experts of `layers`
    memory_kind: str
    expert_bytes: int                       # bytes of one expert (all its weights)
    shapes: dict                            # weight -> (shape of one expert, dtype)

    @property
    def num_experts(self) -> int:
        return self.cfg.decoder.moe.num_experts

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * len(self.host)

    @classmethod
    def from_params(cls, cfg: VLMConfig, params, device=None) -> "ExpertStore":
        """Move every routed expert to host memory one (layer, expert) at a time."""
        device = device or jax.devices()[0]
        kind = host_memory_kind(device)
        to_host = SingleDeviceSharding(device, memory_kind=kind)
        layers = moe_layers(cfg)
        if not layers:
            raise ValueError(f"{cfg.name} has no hard-MoE decoder layers to offload")
        dense = {k: v for k, v in params.items()}
        dense["decoder"] = dict(params["decoder"])
        host, shapes = {}, {}
        for i in layers:
            name = f"layer_{i}"
            layer = dict(params["decoder"][name])
            ffn = dict(layer["ffn"])
            experts = ffn.pop("experts")
            for e in range(cfg.decoder.moe.num_experts):
                host[i, e] = {w: jax.device_put(np.asarray(a[e]), to_host)
                              for w, a in experts.items()}
            shapes = {w: (tuple(a.shape[1:]), np.dtype(a.dtype)) for w, a in experts.items()}
            layer["ffn"] = ffn
            dense["decoder"][name] = layer
        expert_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in shapes.values())
        return cls(cfg, layers, host, dense, kind, expert_bytes, shapes)


class SlotPool:
    """S device slots for experts; loads by async device_put + in-place slot update.

    Public state: `arrays` (weight -> (S, ...) device array), `num_slots`, `budget_bytes`,
    `device` and `sharding` (where the slots live), and the counters `loads` and
    `bytes_loaded`. Which expert sits in which slot is private: ask `is_resident`, `resident`,
    `first_free_slot` and `slot_table`, and change it with `load` and `free`.
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, device=None):
        self.store = store
        self.num_slots = budget_slots(budget_bytes, store.expert_bytes)
        if self.num_slots < 1:
            raise ValueError(f"expert budget {budget_bytes} B holds no expert; one expert of "
                             f"{store.cfg.name} is {store.expert_bytes} B")
        self.budget_bytes = budget_bytes
        self.device = device or jax.devices()[0]
        self.sharding = SingleDeviceSharding(self.device, memory_kind="device")
        self.arrays = {w: jax.device_put(jnp.zeros((self.num_slots,) + s, d), self.sharding)
                       for w, (s, d) in store.shapes.items()}
        self._owner: list[tuple[int, int] | None] = [None] * self.num_slots   # slot -> key
        self._slot_of: dict[tuple[int, int], int] = {}                        # key -> slot
        self.bytes_loaded = 0
        self.loads = 0
        self._update = jax.jit(_set_slot, donate_argnums=0)

    @property
    def pool_bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.arrays.values())

    def is_resident(self, key: tuple[int, int]) -> bool:
        return key in self._slot_of

    def resident(self) -> frozenset:
        """The (layer, expert) keys in the pool."""
        return frozenset(self._slot_of)

    def first_free_slot(self) -> int | None:
        """The lowest slot that holds no expert, or None when the pool is full."""
        return next((s for s, key in enumerate(self._owner) if key is None), None)

    def free(self, key: tuple[int, int]) -> None:
        """Expert `key` leaves the pool: its slot is free (its weights stay until overwritten)."""
        if key not in self._slot_of:
            raise KeyError(f"expert {key} is not in the pool (resident: {sorted(self._slot_of)})")
        self._owner[self._slot_of.pop(key)] = None

    def load(self, key: tuple[int, int], slot: int | None = None) -> dict:
        """Copy expert `key` = (layer, expert) into `slot` (default: the first free one),
        replacing whatever was there (if key was resident in another slot, that slot is freed).
        Returns the staged device arrays of the (async) copy: block on them to wait for it."""
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
        staged = {w: jax.device_put(a, self.sharding) for w, a in self.store.host[key].items()}
        self.arrays = self._update(self.arrays, jnp.int32(slot), staged)
        if key in self._slot_of:
            self.free(key)
        old = self._owner[slot]
        if old is not None:
            del self._slot_of[old]
        self._owner[slot] = key
        self._slot_of[key] = slot
        self.bytes_loaded += self.store.expert_bytes
        self.loads += 1
        if self.pool_bytes > self.budget_bytes:
            raise AssertionError(f"pool holds {self.pool_bytes} B, over its budget of "
                                 f"{self.budget_bytes} B")
        return staged

    def slot_table(self, layer: int) -> np.ndarray:
        """(E,) int32: the slot of each expert of `layer`, -1 if not resident."""
        return np.asarray([self._slot_of.get((layer, e), -1)
                           for e in range(self.store.num_experts)], np.int32)


def _set_slot(arrays: dict, slot, staged: dict) -> dict:
    return {w: a.at[slot].set(staged[w]) for w, a in arrays.items()}
