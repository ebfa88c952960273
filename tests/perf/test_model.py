"""The roofline arithmetic, hardware specs, memory estimate and the calibration fit."""

import dataclasses
import json

import pytest

from moex.config import get_config
from moex.info import model_info
from moex.nn.decoder import kv_bytes_per_token
from moex.perf.calibrate import fit_gemm, gemm_model, write_calibration
from moex.perf.counts import Piece
from moex.perf.hardware import GPUS, NOMINAL_CPU, Hardware, get_hardware
from moex.perf.model import memory_bytes, offloaded, piece_time, predict, roofline_table

HAND = Hardware(name="hand", peak_flops={"float32": 1e12}, memory_bandwidth=1e11,
                memory_bytes=1e10, link_bandwidth=1e10, link_latency=1e-5, host_flops=1e11,
                host_memory_bandwidth=1e10, op_overhead=1e-6, rows_half=0.0, overlap=True)


def test_piece_time_is_the_roofline_by_hand():
    # 2 GFLOP at 1 TFLOP/s = 2 ms; 100 MB at 100 GB/s = 1 ms; 3 kernels at 1 us
    p = Piece("x", flops=2e9, weight_bytes=6e7, act_bytes=4e7, rows=1e9, ops=3)
    t = piece_time(p, HAND, "float32")
    assert t.compute == pytest.approx(2e-3) and t.memory == pytest.approx(1e-3)
    assert t.seconds == pytest.approx(2e-3 + 3e-6) and t.bound == "compute"
    # where compute and memory do not overlap (a CPU) the terms add
    serial = piece_time(p, dataclasses.replace(HAND, overlap=False), "float32")
    assert serial.seconds == pytest.approx(3e-3 + 3e-6)
    # a link term: 1 GB at 10 GB/s + 2 copies x 10 us
    linked = piece_time(dataclasses.replace(p, link_bytes=1e9, copies=2), HAND, "float32")
    assert linked.link == pytest.approx(0.1 + 2e-5) and linked.bound == "link"


def test_rows_half_slows_small_gemms():
    hw = dataclasses.replace(HAND, rows_half=8.0)
    # M = 8 rows reach half the peak
    assert hw.matmul_seconds(1e9, 8, "float32") == pytest.approx(2e-3)
    assert hw.matmul_seconds(1e9, 8, "bfloat16") == pytest.approx(2e-3)   # falls back to fp32


def test_scores_cost_bytes_on_a_gpu_and_throughput_on_a_calibrated_cpu():
    p = Piece("attention core", scores=1e6)
    assert piece_time(p, HAND, "float32").memory == pytest.approx(16e6 / 1e11)
    p = dataclasses.replace(p, keys=1000)
    cpu = dataclasses.replace(HAND, softmax_rates=((100, 2e9), (10000, 1e9)))
    # 1000 keys: halfway between 100 and 10000 in log -> 1.5e9 elements/s
    assert piece_time(p, cpu, "float32").memory == pytest.approx(1e6 / 1.5e9)
    assert cpu.softmax_seconds(1e6, 10) == pytest.approx(1e6 / 2e9)     # clamped


def test_mixtral_decode_on_h200_is_memory_bound_and_at_least_its_bytes():
    cfg = get_config("mixtral-8x7b")
    hw = get_hardware("h200")
    p = predict(cfg, hw, "decode", 1, 2048)
    assert p.bound == "memory"
    # at least the bytes of 2 experts x 32 layers + attention at the achievable bandwidth
    assert p.seconds > 32 * 2 * 3 * 4096 * 14336 * 2 / hw.memory_bandwidth
    assert p.tokens_per_s == pytest.approx(1 / p.seconds)
    text = roofline_table(p)
    assert "routed experts" in text and "memory" in text
    # a large prefill is compute-bound
    assert predict(cfg, hw, "prefill", 8, 2048).bound == "compute"


def test_offloading_adds_a_link_term_to_expert_pieces_only():
    cfg = get_config("mixtral-8x7b")
    hw = get_hardware("rtx4090")
    full = predict(cfg, hw, "decode", 1, 1024)
    half = predict(cfg, hw, "decode", 1, 1024, offload=0.5)
    link = sum(r["link_bytes"] for r in half.rows())
    experts = sum(t.piece.weight_bytes for t in full.times if t.piece.name == "routed experts")
    assert link == pytest.approx(0.5 * experts)
    assert half.bound == "link" and half.seconds > full.seconds
    with pytest.raises(ValueError, match="offloaded fraction"):
        offloaded([], 1.5)


def test_memory_bytes_from_shapes():
    cfg = get_config("llava-1.5-7b")
    m = memory_bytes(cfg, 4, 2048)
    assert m["weights"] == 2 * model_info(cfg).total_params
    assert m["kv_cache"] == 4 * 2048 * kv_bytes_per_token(cfg.decoder, 2)
    assert m["total"] == m["weights"] + m["kv_cache"] + m["transient"]
    hard = get_config("mixtral-8x7b")
    off = memory_bytes(hard, 1, 1024, offload=0.5)
    assert off["weights"] == pytest.approx(2 * model_info(hard).total_params
                                           - model_info(hard).routed_expert_params)


def test_hardware_specs_and_errors(tmp_path, monkeypatch):
    assert set(GPUS) == {"h200", "h100", "a100-80g", "l4", "rtx4090"}
    assert get_hardware("h200").memory_bandwidth > get_hardware("a100-80g").memory_bandwidth
    assert get_hardware("h200").link_bandwidth > get_hardware("rtx4090").link_bandwidth
    with pytest.raises(KeyError, match="h200"):
        get_hardware("tpu-v9")
    monkeypatch.setenv("MOEX_CALIBRATION", str(tmp_path / "none.json"))
    assert get_hardware("cpu") is NOMINAL_CPU
    spec = dataclasses.replace(NOMINAL_CPU, memory_bandwidth=1.234e10, source="test")
    path = write_calibration({"hardware": spec.as_dict()}, tmp_path / "cal.json")
    monkeypatch.setenv("MOEX_CALIBRATION", str(path))
    assert get_hardware("cpu").memory_bandwidth == 1.234e10
    assert get_hardware(str(path)).source == "test"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hardware": {"name": "x", "warp_speed": 9}}))
    with pytest.raises(ValueError, match="warp_speed"):
        get_hardware(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        get_hardware(str(tmp_path / "missing.json"))


def test_gemm_fit_recovers_known_parameters_despite_a_disturbed_point():
    bw, peak = 12e9, 150e9
    points = [dict(rows=m, flops=4.0 * m * 512 * 1024 * 32, weight_bytes=2 * 512 * 1024 * 32 * 4,
                   act_bytes=2 * m * 1536 * 32 * 4)
              for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)]
    for p in points:
        p["seconds"] = gemm_model(p, bw, peak)
    points[9]["seconds"] *= 1.8                     # another process ran during that repeat
    points[1]["seconds"] *= 1.5
    got_bw, got_peak = fit_gemm(points)
    assert got_bw == pytest.approx(bw, rel=0.01)
    assert got_peak == pytest.approx(peak, rel=0.01)
