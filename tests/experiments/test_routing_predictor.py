"""The routing-path predictor study (`moex predictor study`) end to end at test size: LM, traces
of both domains, one predictor per domain, the evaluation tables, the offload bench with the
code predictor as `predictive:DIR`, and the scheduler study."""

import csv
import json

from moex.cli import main


def test_study_end_to_end(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert main(["predictor", "study", "--preset", "tiny-hard", "--lm-steps", "2",
                 "--requests", "4", "--heldout-requests", "8", "--prompt-len", "12",
                 "--new-tokens", "3", "--predictor-steps", "3", "--bench-repeats", "1",
                 "--no-vlm", "--runs", str(runs), "--out", str(out)]) == 0
    evals = json.loads((out / "predictor_eval.json").read_text())
    assert set(evals) == {"code", "prose"}
    for report in evals.values():                      # in-domain and cross-domain traces
        assert len(report["traces"]) == 2
    rows = list(csv.DictReader(open(out / "offload" / "results.csv")))
    assert {r["policy"] for r in rows} == {"all-resident", "lru", "pregated", "predictive:rpp",
                                           "predictive:oracle"}
    sched = json.loads((out / "scheduler.json").read_text())
    assert sched["steps_scheduled"] > 0
    # the scheduler never needs more distinct experts than FIFO on the routes it scheduled on
    totals = sched["distinct_experts_sum"]
    assert totals["scheduled_on_true_routes"] <= totals["fifo"]
    # each step is cached under --runs (a rerun only measures)
    assert (runs / "lm" / "tiny-hard" / "model" / "config.json").exists()
    assert len(list((runs / "traces").glob("tiny-hard-*.npz"))) == 4
    cached = sorted(p.name for p in (runs / "rpp").iterdir())
    assert cached == ["tiny-hard-code", "tiny-hard-code.train", "tiny-hard-prose",
                      "tiny-hard-prose.train"]
