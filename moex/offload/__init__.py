"""Host offloading of experts: the host expert store and the device slot pool (store.py), and
routing traces (trace.py), demand cache policies and the cache core that counts hits and misses
(policies.py), and the trace-replay simulator (simulator.py).

The engine that runs prefill / decode layer by layer under these policies and the prefetching
policies build on these (offload issue)."""

from moex.offload.store import ExpertStore, SlotPool, host_memory_kind, moe_layers  # noqa: F401
from moex.offload.trace import Trace, TraceRecorder  # noqa: F401
from moex.offload.policies import CacheCore, make_policy, stream_from_trace  # noqa: F401
from moex.offload.simulator import ComputeModel, TransferModel, simulate  # noqa: F401
