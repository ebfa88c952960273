"""Result files of a benchmark: CSV, JSON (with config and environment) and a markdown report,
written to a temp dir beside the output dir and renamed into place (never half-written)."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Callable

from moex.bench.timing import environment
from moex.checkpoint import staged


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: one header row, a rule, then the rows (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_outputs(out, rows: list[dict], config: dict, report_md: str,
                  extra: Callable[[pathlib.Path], object] | None = None) -> pathlib.Path:
    """`extra(tmp_dir)` writes further files (plots) into the staged dir before it is published."""
    with staged(out, replace=True) as tmp:
        with open(tmp / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        env = environment()
        meta = {"config": config, "environment": env, "rows": rows}
        (tmp / "results.json").write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "report.md").write_text(f"{report_md}\n\nEnvironment: `{json.dumps(env)}`\n")
        if extra is not None:
            extra(tmp)
    return pathlib.Path(out)
