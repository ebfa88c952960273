"""Result files of a benchmark: CSV, JSON (with config and environment) and a markdown report,
written to a temp dir beside the output dir and renamed into place (never half-written)."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import tempfile

from moex.bench.timing import environment


def write_outputs(out, rows: list[dict], config: dict, report_md: str) -> pathlib.Path:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with open(tmp / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        env = environment()
        meta = {"config": config, "environment": env, "rows": rows}
        (tmp / "results.json").write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "report.md").write_text(f"{report_md}\n\nEnvironment: `{json.dumps(env)}`\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
