"""Before / after: the offload engine of an earlier git revision against this checkout's, and
both against the whole-model jitted decode, interleaved in one process (same prompts, same
machine state; medians over repeats).

    python experiments/engine_ab.py --rev 54fcf1e
    python experiments/engine_ab.py --rev 54fcf1e --checkpoint results/offload_hf/moex \\
        --points all-resident@100% pregated@50% predictive:oracle@50% --batch 1 4 --repeats 6

The earlier revision's `moex` package is exported with `git archive` into a temporary folder
and imported as `moex_before` (its imports rewritten), so both engines run side by side. The
all-resident engines preload every expert where the revision can (`warm`); an earlier engine
without it starts from a cold pool.
Prints a markdown table and writes it with the rows as JSON to --out.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBPACKAGES = r"(nn|offload|config|generate|model|predict|checkpoint|tokenizer|data|measure|" \
              r"experiments|info|cli|seq2seq|eval|perf|train|upcycle)"


def export(rev: str, folder: pathlib.Path) -> str:
    """The `moex` package at `rev` as folder/moex_before (imports rewritten)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "moex"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "moex").rename(folder / "moex_before")
    for path in (folder / "moex_before").rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bfrom moex([. ])", r"from moex_before\1", text)
        text = re.sub(r"\bimport moex\b", "import moex_before", text)
        text = re.sub(rf"\bmoex\.{SUBPACKAGES}\b", r"moex_before.\1", text)
        path.write_text(text)
    return "moex_before"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="the earlier revision (e.g. 54fcf1e)")
    p.add_argument("--preset", default="small-hard")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--points", nargs="+", default=["all-resident@100%", "pregated@50%",
                                                   "predictive:oracle@50%", "lru@50%"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", default="results/engine_ab")
    a = p.parse_args(argv)

    from moex.checkpoint import load_model
    from moex.experiments.offload_grid import jitted_decode, prompts
    from moex.offload.engine import OffloadEngine
    from moex.offload.spec import parse_budget, parse_policy
    from moex.offload.store import ExpertStore
    from moex.predict.forecast import make_forecaster

    tmp = tempfile.TemporaryDirectory()
    sys.path.insert(0, tmp.name)
    name = export(a.rev, pathlib.Path(tmp.name))
    old = {m: importlib.import_module(f"{name}.{m}") for m in
           ("checkpoint", "offload.engine", "offload.store", "offload.spec",
            "predict.forecast")}
    source = a.checkpoint or a.preset
    new_model = load_model(source, 0)
    old_model = old["checkpoint"].load_model(source, 0)
    sides = {"after": (new_model.cfg, ExpertStore.from_params(new_model.cfg, new_model.params),
                       OffloadEngine, parse_policy, make_forecaster),
             "before": (old_model.cfg, old["offload.store"].ExpertStore.from_params(
                 old_model.cfg, old_model.params), old["offload.engine"].OffloadEngine,
                 old["offload.spec"].parse_policy, old["predict.forecast"].make_forecaster)}
    points = [pt.partition("@")[::2] for pt in a.points]
    rows = []
    for batch in a.batch:
        ids, mask, images = prompts(new_model, batch, a.prompt_len, batch)
        other = prompts(new_model, batch, a.prompt_len, batch + 1000)
        traces = {}
        for side, (cfg, store, engine, _, _) in sides.items():
            for key, (i, m, _) in (("ref", (ids, mask, None)), ("cal", other)):
                eng = engine(cfg, None, "all-resident", store.total_bytes, store=store)
                eng.generate(i, m, max_new_tokens=a.new_tokens, stop_tokens=())
                traces[side, key] = eng.trace()
        rates: dict = {}
        for r in range(a.repeats + 1):                       # the first run warms up
            jit = jitted_decode(new_model.cfg, new_model.params, (ids, mask, images),
                                a.new_tokens, 1)["decode_tok_s"]
            rates.setdefault("jitted", []).append(jit)
            for policy, budget in points:
                for side, (cfg, store, engine, parse, forecaster_of) in sides.items():
                    spec = parse(policy)
                    kw = {"warm": True} if spec.policy == "all-resident" and \
                        "warm" in inspect.signature(engine).parameters else {}
                    eng = engine(cfg, None, spec.policy, parse_budget(budget, store.total_bytes),
                                 store=store, forecaster=forecaster_of(
                                     spec, traces[side, "ref"], traces[side, "cal"]), **kw)
                    eng.generate(ids, mask, max_new_tokens=a.new_tokens, stop_tokens=())
                    t = eng.timings
                    rates.setdefault((policy, budget, side), []).append(
                        batch * t["decode_steps"] / t["decode_s"])
                    if side == "after":
                        rates[(policy, budget, "recomputed")] = [t["decode_recomputed"]]
                        rates[(policy, budget, "waited")] = [t["decode_waited"]]
        jit = statistics.median(rates["jitted"][1:])
        for policy, budget in points:
            before = statistics.median(rates[(policy, budget, "before")][1:])
            after = statistics.median(rates[(policy, budget, "after")][1:])
            rows.append({"batch": batch, "policy": policy, "budget": budget,
                         "jitted_tok_s": jit, "before_tok_s": before, "after_tok_s": after,
                         "before_x_jitted": before / jit, "after_x_jitted": after / jit,
                         "after_x_before": after / before,
                         "recomputed_decode": rates[(policy, budget, "recomputed")][0],
                         "waited_decode": rates[(policy, budget, "waited")][0]})
    lines = [f"Engine before ({a.rev}) and after (this checkout) on {new_model.cfg.name}; "
             f"medians of {a.repeats} interleaved runs, {a.new_tokens} new tokens, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| B | policy | budget | jitted tok/s | before tok/s (x jitted) "
             "| after tok/s (x jitted) | after / before | recomputed (decode) | waited (decode) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['policy']} | {r['budget']} | {r['jitted_tok_s']:.1f} "
                     f"| {r['before_tok_s']:.1f} ({r['before_x_jitted']:.2f}) "
                     f"| {r['after_tok_s']:.1f} ({r['after_x_jitted']:.2f}) "
                     f"| {r['after_x_before']:.2f} | {r['recomputed_decode']} "
                     f"| {r['waited_decode']} |")
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
