"""Host offloading of experts: the host expert store and the device slot pool (store.py), and
routing traces (trace.py).

The engine that runs prefill / decode layer by layer under cache policies, the policies and the
replay simulator build on these (offload issue)."""

from moex.offload.store import ExpertStore, SlotPool, host_memory_kind, moe_layers  # noqa: F401
from moex.offload.trace import Trace, TraceRecorder  # noqa: F401
