"""experiments/vlm_efficiency.py end to end on test-size models: the recipe trains a word-level
family (dense, then upcycled hard and soft), the grid runs on the tiny presets' random weights;
one CSV row per (model, batch, seq_len, policy, budget), no missing values, routing and learning
curves reported, plots written; the report names which models each table uses."""

import csv
import json
import math

import pytest

from moex.cli import main
from moex.config import PRESETS
from moex.data import SyntheticSpec, write_synthetic
from tests.test_train_vlm import _test_family


@pytest.fixture(autouse=True)
def test_family(monkeypatch):
    for name, fn in _test_family().items():
        monkeypatch.setitem(PRESETS, name, fn)


def test_experiment_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic(data, SyntheticSpec(seed=0))     # the default spec, as the main job uses
    out = tmp_path / "out"
    args = [
        "efficiency", "--family", "wtest", "--grid-family", "tiny", "--train-steps", "6",
        "--finetune-steps", "4", "--batch", "1", "2", "--seq", "48", "64",
        "--max-tokens", "64", "--repeats", "1", "--warmup", "1", "--decode-steps", "2",
        "--policies", "lru", "pregated", "predictive:prior", "--budgets", "50%", "--offload-batch", "2",
        "--offload-new-tokens", "2", "--offload-repeats", "1", "--eval-questions", "6",
        "--eval-batch", "4", "--routing-questions", "8", "--data", str(data),
        "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert main(args) == 0          # the command line; predictive:prior was once refused there
    rows = list(csv.DictReader(open(out / "results.csv")))
    keys = [(r["model"], r["batch"], r["seq_len"], r["policy"], r["budget"]) for r in rows]
    resident = {(f"tiny-{k}", str(b), str(t), "resident-jit", "100%")
                for k in ("dense", "hard", "soft") for b, t in ((1, 48), (1, 64))}
    offload = {(m, b, t, p, bud) for m, b, t, p, bud in keys if p != "resident-jit"}
    assert {(m, b, p, bud) for m, b, _, p, bud in offload} == {
        ("wtest-hard", "2", p, b) for p, b in (("all-resident", "100%"), ("lru", "50%"),
                                               ("pregated", "50%"), ("predictive:prior", "50%"))}
    assert len(keys) == len(set(keys)) and set(keys) == resident | offload
    for r in rows:
        for k, v in r.items():
            assert v != "" and v.lower() != "none", (k, r)
        assert float(r["prefill_tokens_per_s"]) > 0 and float(r["decode_tokens_per_s"]) > 0
        acc = float(r["acc_mmbench_plain"])          # the grid's random models were not scored
        assert math.isnan(acc) if r["model"].startswith("tiny") else 0 <= acc <= 1
        assert r["weights"] == ("random weights" if r["model"].startswith("tiny") else "trained")
    by = {(r["policy"], r["budget"]): r for r in rows if r["model"] == "wtest-hard"}
    # offloading keeps fewer expert bytes on the device than all-resident
    assert float(by[("lru", "50%")]["param_bytes_experts"]) < \
        float(by[("all-resident", "100%")]["param_bytes_experts"])
    meta = json.loads((out / "results.json").read_text())
    assert meta["config"]["skipped"] == ["B=2 T=48 (B x T > 64)", "B=2 T=64 (B x T > 64)"]
    assert meta["config"]["models"]["grid"] == ["tiny-dense", "tiny-hard", "tiny-soft"]
    acc = json.loads((out / "accuracy.json").read_text())
    assert [a["model"] for a in acc] == ["wtest-dense", "wtest-hard", "wtest-soft"]
    assert all(a["tables"]["mmbench_circular"]["count"] == 6 for a in acc)
    assert [e["step"] for e in acc[0]["learning_curve"]] == [6]
    # an upcycled model's steps continue from the dense start's last step (6)
    assert [(e["step"], e["finetune_step"]) for e in acc[1]["learning_curve"]] == [(10, 4)]
    routes = json.loads((out / "routing.json").read_text())
    assert [r["model"] for r in routes] == ["wtest-hard"]
    assert [r["layer"] for r in routes[0]["load"]] == [0, 1]
    for r in routes[0]["load"]:
        assert 0 <= r["entropy"] <= 1 + 1e-9 and 0.25 <= r["busiest_share"] <= 1
    for png in ("throughput_vs_batch.png", "memory_vs_batch.png", "throughput_vs_memory.png",
                "learning_curves.png", "routing_wtest-hard.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for part in ("## Models", "## Accuracy", "## Learning curves", "## Routing",
                 "## Expert offloading", "tiny-hard (random weights)", "wtest-hard (trained)"):
        assert part in report, part
