"""The expert-prediction study (`moex predictor study`) end to end at test size: LM, traces of
both domains with hidden states, one predictor and one head set per domain (and the pre-attention
heads on code), the evaluation tables, the predictors' costs, the offload bench with the code
predictor as `predictive:DIR`, the heads as `lookahead:DIR` and both as the combined policy, and
the scheduler study on each prediction."""

import csv
import json

from moex.cli import main
from moex.offload.trace import Trace


def test_study_end_to_end(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert main(["predictor", "study", "--preset", "tiny-hard", "--lm-steps", "2",
                 "--requests", "4", "--heldout-requests", "8", "--prompt-len", "12",
                 "--new-tokens", "3", "--predictor-steps", "3", "--head-steps", "3",
                 "--head-hidden", "8", "--bench-repeats", "1",
                 "--no-vlm", "--runs", str(runs), "--out", str(out)]) == 0
    evals = json.loads((out / "predictor_eval.json").read_text())
    assert set(evals) == {"code", "prose"}
    for report in evals.values():                      # in-domain and cross-domain traces
        assert len(report["traces"]) == 2
        for methods in report["traces"].values():
            assert {"rpp", "lookahead_d1", "lookahead_d2", "lookahead_d3", "pregate", "tlp",
                    "slp", "prior"} <= set(methods)
    # the code predictors also have the pre-attention heads (d = 0 .. 3)
    assert "preattn_d0" in evals["code"]["traces"]["tiny-hard-code-heldout.npz"]
    costs = json.loads((out / "costs.json").read_text())
    assert costs["lookahead_head_s_per_token_layer"] > 0 and costs["head_params_per_layer"] > 0
    rows = list(csv.DictReader(open(out / "offload" / "results.csv")))
    assert {r["policy"] for r in rows} == {"all-resident", "lru", "pregated", "predictive:rpp",
                                           "lookahead", "predictive:rpp+lookahead",
                                           "predictive:oracle"}
    sched = json.loads((out / "scheduler.json").read_text())
    assert sched["steps_scheduled"] > 0
    # the scheduler never needs more distinct experts than FIFO on the routes it scheduled on
    totals = sched["distinct_experts_sum"]
    assert totals["true_routes"] <= totals["fifo"]
    assert set(sched["reduction_vs_fifo"]) == {"rpp", "tlp", "lookahead", "true_routes"}
    # each step is cached under --runs (a rerun only measures)
    assert (runs / "lm" / "tiny-hard" / "model" / "config.json").exists()
    assert len(list((runs / "traces").glob("tiny-hard-*.npz"))) == 4
    cached = sorted(p.name for p in (runs / "rpp").iterdir())
    assert cached == ["tiny-hard-code", "tiny-hard-code.train", "tiny-hard-prose",
                      "tiny-hard-prose.train"]
    heads = sorted(p.name for p in (runs / "heads").iterdir() if not p.name.endswith(".train"))
    assert heads == ["tiny-hard-code", "tiny-hard-code-pre", "tiny-hard-prose"]
    assert Trace.load(runs / "traces" / "tiny-hard-code-train.npz").hidden is not None
