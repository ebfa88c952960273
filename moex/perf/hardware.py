"""Hardware specs as data: what the performance model needs to know about a machine.

    hw = get_hardware("h200")            # or h100, a100-80g, l4, rtx4090, cpu
    hw.matmul_seconds(flops, rows, "bfloat16")

Every number of a GPU is the vendor's datasheet peak (sources beside each entry); `*_efficiency`
is the fraction of it a well-written kernel reaches in practice, documented once here:
  MATMUL_EFFICIENCY 0.7   large bf16 GEMMs reach 60-80 % of the tensor-core peak (cuBLAS);
  MEMORY_EFFICIENCY 0.85  streaming reads reach ~85 % of the HBM / GDDR peak;
  LINK_EFFICIENCY 0.8     pinned host -> device copies reach ~80 % of the PCIe peak
                          (REFERENCES.md warns that jax's device_put can fall far below: the
                          GPU check measures it and the projection should be rerun with it).
`rows_half`: a GEMM with M rows reaches M / (M + rows_half) of the large-M rate (small M leaves
the tensor cores idle; 64 on GPUs is the row tile). `overlap`: on a GPU, compute and memory
traffic of one kernel overlap, so a piece takes max(compute, memory) (the roofline); on a CPU
the same cores do both and the measured times add (moex.perf.calibrate shows the fit).

"this CPU" (`cpu`) is not a datasheet: `moex perf calibrate` measures it (GEMM FLOP/s over row
counts, streaming bandwidth, softmax throughput, per-operation overhead, host -> device copy)
and writes runs/perf/calibration.json; `get_hardware("cpu")` reads that file (or the one
$MOEX_CALIBRATION names) and falls back to NOMINAL_CPU, a 2-core AVX-512 estimate, with a
warning in its `source`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

MATMUL_EFFICIENCY = 0.7
MEMORY_EFFICIENCY = 0.85
LINK_EFFICIENCY = 0.8
CALIBRATION = "runs/perf/calibration.json"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU) with its link to host memory. Rates are achievable ones (the
    datasheet peak times the efficiency above); bytes in decimal units."""

    name: str
    peak_flops: dict                      # dtype -> FLOP/s of large GEMMs ("float32", "bfloat16")
    memory_bandwidth: float               # device memory (HBM / GDDR / DRAM) bytes/s
    memory_bytes: float                   # device memory capacity
    link_bandwidth: float                 # host -> device bytes/s (pinned copies)
    link_latency: float                   # seconds per copy
    host_flops: float                     # host CPU FLOP/s (fp32), for host-computed experts
    host_memory_bandwidth: float          # host DRAM bytes/s
    op_overhead: float                    # seconds per kernel (GPU launch / CPU thunk dispatch)
    rows_half: float = 64.0               # GEMM rows at which half the large-M rate is reached
    softmax_rates: tuple = ()             # ((keys, elements/s), ...) of masked softmax by key
                                          # length (calibrated CPUs); () = bytes at bandwidth
    overlap: bool = True                  # piece time = max(compute, memory) (else the sum)
    source: str = ""

    def softmax_seconds(self, elements: float, keys: float) -> float:
        """Softmax time of `elements` scores in rows of `keys` keys: the rate interpolated in
        log(keys) between the calibrated points (the nearest one outside them)."""
        if not elements:
            return 0.0
        pts = sorted(self.softmax_rates)
        ks = np.log([max(k, 1.0) for k, _ in pts])
        rate = float(np.interp(np.log(max(keys, 1.0)), ks, [r for _, r in pts]))
        return elements / rate

    def flops_for(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops["float32"]

    def matmul_seconds(self, flops: float, rows: float, dtype: str) -> float:
        """Compute time of GEMMs with `rows` rows (M) doing `flops` in all."""
        if flops <= 0:
            return 0.0
        rows = max(rows, 1.0)
        return flops / (self.flops_for(dtype) * rows / (rows + self.rows_half))

    def memory_seconds(self, nbytes: float) -> float:
        return nbytes / self.memory_bandwidth

    def link_seconds(self, nbytes: float, copies: int = 1) -> float:
        return nbytes / self.link_bandwidth + copies * self.link_latency if nbytes else 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gpu(name, bf16_tflops, fp32_tflops, hbm_tbs, mem_gb, pcie_gbs, source,
         host_tflops=3.0, host_bw_gbs=300.0) -> Hardware:
    return Hardware(
        name=name,
        peak_flops={"bfloat16": bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
                    "float16": bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
                    "float32": fp32_tflops * 1e12 * MATMUL_EFFICIENCY},
        memory_bandwidth=hbm_tbs * 1e12 * MEMORY_EFFICIENCY, memory_bytes=mem_gb * 1e9,
        link_bandwidth=pcie_gbs * 1e9 * LINK_EFFICIENCY, link_latency=10e-6,
        host_flops=host_tflops * 1e12, host_memory_bandwidth=host_bw_gbs * 1e9,
        op_overhead=5e-6, rows_half=64.0, overlap=True, source=source)


# Host side of a GPU server (host_flops, host_memory_bandwidth): a 2-socket x86 server with
# 8-12 DDR5 channels per socket (~300 GB/s usable) and ~3 TFLOP/s fp32 (AVX-512, ~100 cores);
# a desktop (RTX 4090) has 2 DDR5 channels (~60 GB/s) and ~1 TFLOP/s.
# Link: PCIe 5.0 x16 = 64 GB/s per direction, PCIe 4.0 x16 = 32 GB/s (PCI-SIG).
# Per-copy latency 10 us (cudaMemcpyAsync issue + DMA setup); per-kernel 5 us (launch, jit
# dispatch amortised over a step's kernels).
GPUS = {
    # NVIDIA H200 datasheet: 989 TFLOP/s bf16 dense (1979 with sparsity), 67 TFLOP/s fp32,
    # 4.8 TB/s HBM3e, 141 GB; SXM on PCIe 5.0 x16 to the host.
    "h200": _gpu("h200", 989, 67, 4.8, 141, 64, "NVIDIA H200 datasheet; PCIe 5.0 x16"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 3.35 TB/s HBM3, 80 GB.
    "h100": _gpu("h100", 989, 67, 3.35, 80, 64, "NVIDIA H100 SXM datasheet; PCIe 5.0 x16"),
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s bf16, 19.5 TFLOP/s fp32, 2.039 TB/s HBM2e.
    "a100-80g": _gpu("a100-80g", 312, 19.5, 2.039, 80, 32,
                     "NVIDIA A100 datasheet (80GB SXM); PCIe 4.0 x16"),
    # NVIDIA L4 datasheet: 121 TFLOP/s bf16 dense (242 with sparsity), 30.3 TFLOP/s fp32,
    # 300 GB/s GDDR6, 24 GB.
    "l4": _gpu("l4", 121, 30.3, 0.3, 24, 32, "NVIDIA L4 datasheet; PCIe 4.0 x16"),
    # NVIDIA Ada whitepaper (RTX 4090): 165.2 TFLOP/s bf16 tensor with fp32 accumulate (dense),
    # 82.6 TFLOP/s fp32, 1008 GB/s GDDR6X, 24 GB.
    "rtx4090": _gpu("rtx4090", 165.2, 82.6, 1.008, 24, 32,
                    "NVIDIA Ada Lovelace whitepaper (RTX 4090); PCIe 4.0 x16",
                    host_tflops=1.0, host_bw_gbs=60.0),
}

# Used when this machine has not been calibrated: 2 Zen-4 cores (AVX-512 as 2 x 256-bit FMA,
# 32 fp32 FLOP/cycle at ~2.6 GHz = 166 GFLOP/s) and one DDR5 channel's share (~15 GB/s).
NOMINAL_CPU = Hardware(
    name="cpu", peak_flops={"float32": 160e9, "bfloat16": 80e9}, memory_bandwidth=15e9,
    memory_bytes=24e9, link_bandwidth=15e9, link_latency=20e-6, host_flops=160e9,
    host_memory_bandwidth=15e9, op_overhead=5e-6, rows_half=32.0, softmax_rates=((512, 1e9),),
    overlap=False, source="nominal (not calibrated: run `moex perf calibrate`)")

NAMES = tuple(GPUS) + ("cpu",)


def calibration_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOEX_CALIBRATION", CALIBRATION))


def hardware_from_dict(raw: dict) -> Hardware:
    names = {f.name for f in dataclasses.fields(Hardware)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"hardware spec: unknown keys {sorted(unknown)}; expected a subset of "
                         f"{sorted(names)}")
    raw = dict(raw)
    raw["softmax_rates"] = tuple(tuple(p) for p in raw.get("softmax_rates", ()))
    return Hardware(**raw)


def get_hardware(name: str, calibration: str | os.PathLike | None = None) -> Hardware:
    """A spec by name (NAMES), or a JSON file holding one (a calibration's `hardware`)."""
    if name == "cpu" or name.endswith(".json"):
        path = pathlib.Path(calibration or (name if name.endswith(".json")
                                            else calibration_path()))
        if path.exists():
            raw = json.loads(path.read_text())
            return hardware_from_dict(raw.get("hardware", raw))
        if name.endswith(".json"):
            raise FileNotFoundError(f"hardware spec file {path} does not exist")
        return NOMINAL_CPU
    if name not in GPUS:
        raise KeyError(f"unknown hardware {name!r}; known: {', '.join(NAMES)} or a calibration "
                       f"JSON file")
    return GPUS[name]
