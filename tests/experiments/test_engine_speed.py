"""`moex bench engine`: the engine's decode rates as ratios to the jitted decode measured in
the same run, recompute counts and a per-layer breakdown that adds up to the profiled step."""

import csv
import json

import pytest

from moex.cli import main
from moex.experiments.engine_speed import parse_point


def test_bench_engine_writes_rates_ratios_and_breakdown(tmp_path):
    out = tmp_path / "engine"
    rc = main(["bench", "engine", "--preset", "tiny-hard", "--batch", "2", "--budgets", "50%",
               "--policies", "lru", "--new-tokens", "3", "--repeats", "1", "--breakdown",
               "lru@50%", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["point"] for r in rows] == ["jitted", "all-resident @ 100%",
                                          "all-resident @ 100%, layer by layer", "lru @ 50%"]
    jitted = float(rows[0]["decode_tok_s"])
    for r in rows:
        assert float(r["decode_tok_s"]) > 0
        assert float(r["x_jitted"]) == pytest.approx(float(r["decode_tok_s"]) / jitted)
    fused, layers, lru = rows[1:]
    assert float(fused["fused_steps"]) == 2 and float(fused["recomputed"]) == 0
    assert float(layers["fused_steps"]) == 0 and float(fused["decode_loads"]) == 0
    assert float(lru["decode_loads"]) > 0                     # half the experts: it loads
    assert float(fused["waited"]) == float(layers["waited"]) == 0      # nothing ever missed
    assert 0 <= float(lru["waited"]) <= 2 * 2                 # at most every decode visit
    detail = list(csv.DictReader(open(out / "breakdown.csv")))
    layers_seen = {int(r["layer"]) for r in detail}
    assert {-1, 0, 1} <= layers_seen                           # tiny-hard: MoE layers 0, 1
    assert {r["activity"] for r in detail if int(r["layer"]) >= 0} >= {"layer piece", "plan"}
    assert all(float(r["ms_per_step"]) > 0 for r in detail)
    assert json.loads((out / "results.json").read_text())["config"]["preset"] == "tiny-hard"
    report = (out / "report.md").read_text()
    assert "x jitted" in report and "waited / run" in report and "Where the time goes" in report
    assert (out / "speed.png").stat().st_size > 0


def test_breakdown_points_are_checked():
    with pytest.raises(ValueError, match="expected POLICY@BUDGET"):
        parse_point("pregated")
    with pytest.raises(ValueError):
        parse_point("nonsense@50%")
