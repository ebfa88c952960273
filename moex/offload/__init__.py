"""Host offloading of experts.

  quant.py      int8 / int4 expert copies (qwix numerics, packed int4) for the store
  store.py      the host expert store and the device slot pool
  trace.py      routing traces (file format, recorder)
  cache.py      the cache core: executes a policy's decisions, counts hits / misses / prefetches
  misses.py     what a miss may do besides a full load (low-precision copy, host compute)
                and the cost model that decides
  policies.py   all-resident, on-demand, lru, lfu, pregated, predictive, belady
  forecast.py   forecasters for the predictive policy (oracle, frequency prior)
  simulator.py  trace replay with a transfer and a compute model
  engine.py     the live engine: the decoder layer by layer, experts from the slot pool
  spec.py       policy, forecast and budget strings as values (every command parses them here)
"""

from moex.offload.store import ExpertStore, SlotPool, host_memory_kind, moe_layers  # noqa: F401
from moex.offload.trace import Trace, TraceRecorder  # noqa: F401
from moex.offload.cache import CacheCore, Visit, stream_from_trace  # noqa: F401
from moex.offload.policies import POLICIES, make_policy  # noqa: F401
from moex.offload.forecast import OracleForecast, PriorForecast  # noqa: F401
from moex.offload.simulator import ComputeModel, TransferModel, simulate  # noqa: F401
from moex.offload.engine import OffloadEngine  # noqa: F401
from moex.offload.spec import PolicySpec, parse_budget, parse_policy  # noqa: F401
