"""Host offloading of experts: the host expert store and the device slot pool (store.py).

The engine that runs prefill / decode layer by layer under cache policies, the policies, traces
and the replay simulator build on these (offload issue)."""

from moex.offload.store import ExpertStore, SlotPool, host_memory_kind, moe_layers  # noqa: F401
