"""The main job runs end to end on the tiny presets and writes its result files."""

import csv
import json

from moex.cli import main


def test_compare_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--family", "tiny", "--batch", "1", "2", "--seq", "40",
                 "--decode-steps", "4", "--repeats", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["model"], r["batch"]) for r in rows] == [
        (m, b) for m in ("tiny-dense", "tiny-hard", "tiny-soft") for b in ("1", "2")]
    for r in rows:
        assert all(v != "" for v in r.values())
        assert float(r["prefill_tokens_per_s"]) > 0 and float(r["decode_tokens_per_s"]) > 0
    assert rows[0]["param_bytes_experts"] == "0" and int(rows[2]["param_bytes_experts"]) > 0
    meta = json.loads((out / "results.json").read_text())
    assert meta["environment"]["backend"] == "cpu"
    assert "| tiny-soft | 2 | 40 |" in (out / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dir left
