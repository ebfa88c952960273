"""Host offloading of experts: the host expert store and the device slot pool (store.py), and
routing traces (trace.py), demand cache policies and the cache core that counts hits and misses
(policies.py), the trace-replay simulator (simulator.py), and the live engine that runs the
decoder layer by layer with experts from the slot pool (engine.py).

Prefetching policies (pre-gated, predictive), images in the engine and the CLI are still to come
(offload issue)."""

from moex.offload.store import ExpertStore, SlotPool, host_memory_kind, moe_layers  # noqa: F401
from moex.offload.trace import Trace, TraceRecorder  # noqa: F401
from moex.offload.policies import CacheCore, make_policy, stream_from_trace  # noqa: F401
from moex.offload.simulator import ComputeModel, TransferModel, simulate  # noqa: F401
from moex.offload.engine import OffloadEngine  # noqa: F401
