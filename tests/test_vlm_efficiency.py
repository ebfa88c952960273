"""experiments/vlm_efficiency.py end to end on the tiny presets (few grid points): one CSV row per
(model, batch, seq_len, policy, budget), no missing values, report and plots written."""

import argparse
import csv
import json
import math

from moex.bench import efficiency


def test_experiment_end_to_end(tmp_path, capsys):
    p = argparse.ArgumentParser()
    efficiency.add_arguments(p)
    out = tmp_path / "out"
    args = p.parse_args([
        "--family", "tiny", "--no-train", "--batch", "1", "2", "--seq", "48", "64",
        "--max-tokens", "100", "--repeats", "1", "--warmup", "1", "--decode-steps", "2",
        "--policies", "lru", "pregated", "--budgets", "50%", "--offload-batch", "2",
        "--offload-seq", "48", "--offload-repeats", "1", "--eval-questions", "3",
        "--eval-batch", "4", "--data", str(tmp_path / "data"), "--out", str(out)])
    assert efficiency.main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    keys = [(r["model"], r["batch"], r["seq_len"], r["policy"], r["budget"]) for r in rows]
    resident = {(f"tiny-{k}", str(b), str(t), "resident-jit", "100%")
                for k in ("dense", "hard", "soft") for b, t in ((1, 48), (1, 64), (2, 48))}
    offload = {("tiny-hard", "2", "48", p, b)
               for p, b in (("all-resident", "100%"), ("lru", "50%"), ("pregated", "50%"))}
    assert len(keys) == len(set(keys)) and set(keys) == resident | offload
    for r in rows:
        for k, v in r.items():
            assert v != "" and v.lower() not in ("nan", "none"), (k, r)
    num = lambda r, k: float(r[k])
    for r in rows:
        assert num(r, "prefill_tokens_per_s") > 0 and num(r, "decode_tokens_per_s") > 0
        assert 0 <= num(r, "acc_mmbench_circular") <= num(r, "acc_mmbench_plain") + 1e-9 or \
            math.isfinite(num(r, "acc_mmbench_plain"))
    by = {(r["policy"], r["budget"]): r for r in rows if r["model"] == "tiny-hard"
          and r["batch"] == "2" and r["seq_len"] == "48"}
    # offloading keeps fewer expert bytes on the device than all-resident
    assert num(by[("lru", "50%")], "param_bytes_experts") < \
        num(by[("all-resident", "100%")], "param_bytes_experts")
    meta = json.loads((out / "results.json").read_text())
    assert meta["config"]["skipped"] == ["B=2 T=64 (B x T > 100)"]
    acc = json.loads((out / "accuracy.json").read_text())
    assert [a["model"] for a in acc] == ["tiny-dense", "tiny-hard", "tiny-soft"]
    assert all(a["tables"]["mmbench_circular"]["count"] == 3 for a in acc)
    for png in ("throughput_vs_batch.png", "memory_vs_batch.png", "throughput_vs_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Accuracy" in report and "## Expert offloading" in report
