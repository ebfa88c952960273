"""`moex bench expertflow`: the comparison's rows, ratios, memory arithmetic and report."""

import json

import pytest

from moex.config import get_config
from moex.experiments.expertflow import ExpertFlowConfig, bench, gpu_models, memory_rows
from moex.info import model_info
from moex.perf.hardware import get_hardware


def test_memory_rows_from_shapes():
    rows = {(r[0], int(r[1])): r for r in memory_rows((4, 32))}
    info = model_info("switch-base-32")
    assert float(rows["switch-base-32", 4][2]) == pytest.approx(2 * info.total_params / 1e9,
                                                                abs=0.006)
    assert float(rows["switch-base-32", 32][4]) == pytest.approx(0.0, abs=0.05)  # all resident
    assert float(rows["switch-base-128", 4][4]) > float(rows["switch-base-32", 4][4])


def test_gpu_models_use_the_projected_bytes():
    hw = get_hardware("a100-80g")
    transfer, compute, expert_bytes = gpu_models(get_config("switch-base-32"), hw)
    assert expert_bytes == 2 * 2 * 768 * 3072                   # wi + wo at bf16
    assert transfer.bandwidth_bytes_per_s == hw.link_bandwidth
    assert compute.seconds_per_token == pytest.approx(expert_bytes / hw.memory_bandwidth)


def test_bench_on_a_tiny_switch(tmp_path):
    grid = ExpertFlowConfig(preset="tiny-switch", batch_sizes=(2,), cache_sizes=(1,),
                            repeats=1, new_tokens=3, prompt_len=12, out=str(tmp_path / "ef"))
    out = bench(grid)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["lru", "pregated", "predictive:oracle",
                                           "predictive:prior"]
    lru = rows[0]
    assert lru["x_lru_cpu"] == 1.0 and lru["x_lru_gpu"] == 1.0
    assert all(r["slots"] == 4 for r in rows)                  # 1 expert x 4 MoE layers
    assert all(0 <= r["hit_rate"] <= 1 and r["gpu_decode_tok_s"] > 0 for r in rows)
    # the oracle knows each forward's experts: it misses no more than LRU
    assert rows[2]["misses"] <= lru["misses"]
    text = (out / "report.md").read_text()
    assert "Beside the paper" in text and "speedup over per-layer LRU" in text
    assert (out / "hit_rate.png").stat().st_size > 0
