"""experiments/gpu_check.py end to end on CPU with the tiny presets (--tiny)."""

import json

from moex.cli import main


def test_gpu_check_tiny_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["gpu-check", "--tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted" in text and "measured" in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    grid = [r for r in rows if r["part"] == "grid"]
    offload = [r for r in rows if r["part"] == "offload"]
    assert len(grid) == 3 and all(r["status"] == "ok" for r in grid)
    assert all(r["measured_prefill_s"] > 0 and r["predicted_prefill_s"] > 0 for r in grid)
    # all-resident + lru at 100 % and 50 % budgets (all-resident only where it fits)
    assert {r["policy"] for r in offload} == {"all-resident", "lru"}
    assert all(r["status"] == "ok" and 0 <= r["simulated_hit_rate"] <= 1 for r in offload)
    assert (out / "report.md").read_text().count("| tiny-hard |") >= 2
