"""`moex perf`: the roofline table, calibration to a file, validation and the hardware list."""

import json

from moex.cli import main
from moex.perf.hardware import get_hardware


def test_perf_table_for_a_preset(capsys):
    assert main(["perf", "mixtral-8x7b", "--hardware", "h200", "rtx4090", "--batch", "1",
                 "--seq", "2048", "--phase", "decode"]) == 0
    out = capsys.readouterr().out
    assert out.count("**mixtral-8x7b**") == 2 and "routed experts" in out
    assert "memory-bound" in out
    assert main(["perf", "llava-1.5-7b", "--batch", "1", "8", "--seq", "1024", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and {r["phase"] for r in rows} == {"prefill", "decode"}
    assert any(p["piece"] == "vision attention" for p in rows[0]["pieces"])


def test_perf_errors_name_what_was_expected(capsys):
    assert main(["perf", "no-such-model"]) == 2
    assert "neither a preset nor a moex checkpoint" in capsys.readouterr().err
    assert main(["perf", "mixtral-8x7b", "--hardware", "tpu-v9"]) == 2
    assert "h200" in capsys.readouterr().err


def test_calibrate_then_validate_on_tiny_presets(tmp_path, capsys):
    cal = tmp_path / "cal.json"
    assert main(["perf", "calibrate", "--d-model", "256", "--ffn-dim", "1024", "--layers", "8",
                 "--rows", "1", "16", "256", "1024", "--probe-seqs", "64", "128",
                 "--probe-layers", "1",
                 "--repeats", "1",
                 "--out", str(cal)]) == 0
    hw = get_hardware(str(cal))
    assert hw.name == "cpu" and hw.memory_bandwidth > 0 and len(hw.softmax_rates) == 2
    raw = json.loads(cal.read_text())
    assert len(raw["measurements"]["gemm"]) == 4
    out = tmp_path / "val"
    assert main(["perf", "validate", "--family", "tiny", "--batch", "1", "--seq", "64",
                 "--repeats", "1", "--decode-steps", "2", "--warmup", "1", "--hardware",
                 str(cal), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.count("| tiny-") == 6           # 3 models x (prefill, decode)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows)


def test_hardware_list(capsys):
    assert main(["perf", "hardware"]) == 0
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert names[:5] == ["h200", "h100", "a100-80g", "l4", "rtx4090"] and names[-1] == "cpu"
