"""`moex bench engine`: the offload engine's decode speed against the model without offloading.

    moex bench engine                                   # small-hard, B = 1 and 4
    moex bench engine --checkpoint results/offload_hf/moex      # a converted Mixtral
    moex bench engine --policies pregated --budgets 50% --batch 1 --repeats 3

Per batch size B, on the same prompts (random tokens, left-padded, as `moex bench offload`):
  jitted          the whole-model jitted decode (`moex.generate.Generator`): the baseline
  all-resident    the engine with every expert preloaded, a decode step one fused call
  all-resident, layer by layer   the same with fusing off (`fuse=False`): what fusing buys
  POLICY @ BUDGET each policy at each budget from a cold pool
Each point: decode tokens/s (median, min, max over `repeats` generates after a warm-up), its
ratio to jitted, the layers recomputed per generate (an optimistic dispatch that read an
unresident expert), the layers that waited for their routing (the adaptive dispatch, after a
miss at the layer's previous visit), the fused forwards and the misses.

Where the time goes: each `--breakdown` point runs once more with `profile=True` -- the engine
then waits for the device after every piece, so each activity's time includes its own device
work (a serialized run: slower than the timed ones, but it attributes the time) -- and the
report gives per decode step the time per activity per layer (`OffloadEngine._lap`).

Results under --out: results.csv / results.json (one row per point), breakdown.csv (point,
layer, activity, ms per decode step), report.md and speed.png (ratio to jitted per point).
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics

from moex.checkpoint import load_model
from moex.config import EncDecConfig
from moex.experiments.offload_grid import jitted_decode, prompts
from moex.measure import write_csv, write_outputs
from moex.offload.engine import OffloadEngine
from moex.offload.spec import parse_budget, parse_policy
from moex.offload.store import ExpertStore
from moex.predict.forecast import make_forecaster, make_lookahead
from moex.offload.forecast import reference_run


@dataclasses.dataclass(frozen=True)
class EngineBenchConfig:
    preset: str = "small-hard"
    checkpoint: str | None = None
    policies: tuple[str, ...] = ("lru", "pregated", "predictive:prior", "predictive:oracle")
    budgets: tuple[str, ...] = ("50%", "25%", "12.5%")
    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_len: int = 32
    new_tokens: int = 16
    repeats: int = 5
    seed: int = 0
    breakdown: tuple[str, ...] = ("all-resident@100%", "pregated@50%")   # POLICY@BUDGET
    out: str = "results/engine"


@dataclasses.dataclass(frozen=True)
class Point:
    policy: str                # a policy spec (moex.offload.spec.parse_policy)
    budget: str
    fuse: bool = True

    @property
    def label(self) -> str:
        return f"{self.policy} @ {self.budget}" + ("" if self.fuse else ", layer by layer")


def points_of(grid: EngineBenchConfig) -> list[Point]:
    return [Point("all-resident", "100%"), Point("all-resident", "100%", fuse=False)] + [
        Point(p, b) for b in grid.budgets for p in grid.policies]


def parse_point(text: str) -> Point:
    policy, sep, budget = text.partition("@")
    if not sep:
        raise ValueError(f"--breakdown {text!r}: expected POLICY@BUDGET, e.g. pregated@50%")
    parse_policy(policy)
    return Point(policy, budget)


class Runner:
    """Engines of one model on one batch of prompts (forecasters made once per spec)."""

    def __init__(self, cfg, store, batch: tuple, other: tuple, new_tokens: int):
        self.cfg, self.store, self.batch, self.other = cfg, store, batch, other
        self.new_tokens, self._forecasters, self._reference = new_tokens, {}, None

    def engine(self, point: Point, **kw) -> OffloadEngine:
        spec = parse_policy(point.policy)
        if spec not in self._forecasters:
            if self._reference is None and spec.forecast == "oracle":
                self._reference = reference_run(self.cfg, self.store, *self.batch,
                                                new_tokens=self.new_tokens).trace()
            calibration = None
            if spec.forecast == "prior":
                calibration = reference_run(self.cfg, self.store, *self.other,
                                            new_tokens=self.new_tokens).trace()
            self._forecasters[spec] = make_forecaster(spec, self._reference, calibration)
        return OffloadEngine(self.cfg, None, spec.policy,
                             parse_budget(point.budget, self.store.total_bytes),
                             store=self.store, forecaster=self._forecasters[spec],
                             lookahead=make_lookahead(spec), fuse=point.fuse,
                             warm=spec.policy == "all-resident", **kw)

    def timed(self, point: Point, repeats: int) -> tuple[list[dict], OffloadEngine]:
        """One warm-up generate (compiles this pool size's pieces), then `repeats` timed."""
        runs, eng = [], None
        for i in range(repeats + 1):
            eng = self.engine(point)
            eng.generate(*self.batch, max_new_tokens=self.new_tokens, stop_tokens=())
            if i:
                runs.append({**eng.timings, "misses": eng.core.stats.misses})
        return runs, eng

    def breakdown(self, point: Point) -> list[dict]:
        """A profiled generate (after a compiling one): ms per decode step per (layer,
        activity); layer -1 holds the activities outside the layers (prepare, fused step,
        head, record)."""
        self.timed(point, 0)
        eng = self.engine(point, profile=True)
        eng.generate(*self.batch, max_new_tokens=self.new_tokens, stop_tokens=())
        steps = max(1, eng.timings["decode_steps"])
        return [{"point": point.label, "batch": self.batch[0].shape[0],
                 "layer": -1 if key == "forward" else key, "activity": activity,
                 "ms_per_step": 1e3 * seconds / steps}
                for key, acts in eng.timings["decode_time_s"].items()
                for activity, seconds in sorted(acts.items())]


def run(grid: EngineBenchConfig, progress: bool = True) -> tuple[list[dict], list[dict]]:
    from tqdm import tqdm
    model = load_model(grid.checkpoint or grid.preset, grid.seed)
    cfg = model.cfg
    if isinstance(cfg, EncDecConfig):
        raise ValueError(f"{cfg.name}: moex bench engine times the decoder engine; for an "
                         "encoder-decoder use moex bench offload")
    store = ExpertStore.from_params(cfg, model.params)
    points = points_of(grid)
    detail = [parse_point(p) for p in grid.breakdown]
    bar = tqdm(total=len(grid.batch_sizes) * (len(points) + 1 + len(detail)),
               disable=not progress, desc="engine")
    rows, breakdown = [], []
    for batch in grid.batch_sizes:
        ids, mask, images = prompts(model, batch, grid.prompt_len, grid.seed + batch)
        other = prompts(model, batch, grid.prompt_len, grid.seed + 1000 + batch)
        runner = Runner(cfg, store, (ids, mask, images), other, grid.new_tokens)
        bar.set_postfix_str(f"B={batch} jitted")
        jit = jitted_decode(cfg, model.params, (ids, mask, images), grid.new_tokens,
                            grid.repeats)
        rows.append({"model": cfg.name, "batch": batch, "point": "jitted", "policy": "jitted",
                     "budget": "100%", "fused": "", **jit, "x_jitted": 1.0})
        bar.update()
        for point in points:
            bar.set_postfix_str(f"B={batch} {point.label}")
            try:
                runs, eng = runner.timed(point, grid.repeats)
            except ValueError as e:                       # below the policy's minimum
                rows.append({"model": cfg.name, "batch": batch, "point": point.label,
                             "policy": point.policy, "budget": point.budget,
                             "skipped": str(e)})
                bar.update()
                continue
            rates = [batch * t["decode_steps"] / t["decode_s"] for t in runs]
            med = statistics.median(rates)
            rows.append({"model": cfg.name, "batch": batch, "point": point.label,
                         "policy": point.policy, "budget": point.budget, "fused": point.fuse,
                         "decode_tok_s": med, "decode_tok_s_min": min(rates),
                         "decode_tok_s_max": max(rates), "x_jitted": med / jit["decode_tok_s"],
                         "slots": eng.pool.num_slots,
                         "recomputed": statistics.median(t["decode_recomputed"] for t in runs),
                         "waited": statistics.median(t["decode_waited"] for t in runs),
                         "fused_steps": statistics.median(t["decode_fused"] for t in runs),
                         "decode_loads": statistics.median(t["decode_loads"] for t in runs),
                         "misses": statistics.median(t["misses"] for t in runs)})
            bar.update()
        for point in detail:
            bar.set_postfix_str(f"B={batch} breakdown {point.label}")
            breakdown += runner.breakdown(point)
            bar.update()
    bar.close()
    return rows, breakdown


def markdown(rows: list[dict]) -> str:
    lines = ["| B | point | decode tok/s (min-max) | x jitted | recomputed / run "
             "| waited / run | fused steps | decode loads | slots |", "|" + "---|" * 9]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['point']} | not run: {r['skipped']} "
                         "| | | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['point']} | {r['decode_tok_s']:.1f} "
                     f"({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}) "
                     f"| {r['x_jitted']:.2f} | {r.get('recomputed', '')} "
                     f"| {r.get('waited', '')} | {r.get('fused_steps', '')} "
                     f"| {r.get('decode_loads', '')} | {r.get('slots', '')} |")
    return "\n".join(lines)


def breakdown_md(rows: list[dict]) -> str:
    """Per point: a layer x activity table of ms per decode step (layer 'forward': the
    activities outside the layers)."""
    out = []
    for point, batch in dict.fromkeys((r["point"], r["batch"]) for r in rows):
        mine = [r for r in rows if (r["point"], r["batch"]) == (point, batch)]
        acts = sorted({r["activity"] for r in mine})
        layers = sorted({r["layer"] for r in mine}, key=lambda x: (x < 0, x))
        cell = {(r["layer"], r["activity"]): r["ms_per_step"] for r in mine}
        total = sum(r["ms_per_step"] for r in mine)
        out.append(f"**B={batch}, {point}** (profiled: {total:.2f} ms per decode step in all)"
                   f"\n\n| layer | " + " | ".join(acts) + " | sum |\n|" + "---|" * (len(acts) + 2))
        for layer in layers:
            vals = [cell.get((layer, a), 0.0) for a in acts]
            name = "forward" if layer < 0 else str(layer)
            out.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals)
                       + f" | {sum(vals):.3f} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], folder: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if "skipped" not in r and r["point"] != "jitted"]
    batches = sorted({r["batch"] for r in done})
    labels = list(dict.fromkeys(r["point"] for r in done))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 4))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        by = {r["point"]: r["x_jitted"] for r in done if r["batch"] == b}
        ax.bar([j + i * width for j in range(len(labels))], [by.get(p, 0) for p in labels],
               width, label=f"B={b}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("decode tokens/s / jitted")
    ax.set_title(f"offload engine vs the jitted model ({rows[0]['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "speed.png", dpi=120)
    plt.close(fig)


def bench(grid: EngineBenchConfig) -> pathlib.Path:
    for text in grid.policies:
        parse_policy(text)
    for text in grid.breakdown:
        parse_point(text)
    if grid.new_tokens < 2 or grid.repeats < 1:
        raise ValueError(f"need --new-tokens >= 2 and --repeats >= 1, found {grid.new_tokens} "
                         f"and {grid.repeats}")
    rows, breakdown = run(grid)
    table, detail = markdown(rows), breakdown_md(breakdown)
    report = (f"# Offload engine decode speed: {rows[0]['model']}\n\nRandom-token prompts up "
              f"to {grid.prompt_len} tokens, {grid.new_tokens} new tokens, greedy; medians of "
              f"{grid.repeats} generates after a warm-up; x jitted = decode tokens/s over the "
              f"whole-model jitted decode measured in the same run.\n\n{table}\n\n"
              f"## Where the time goes (ms per decode step, profiled)\n\n{detail}")

    def extra(tmp: pathlib.Path) -> None:
        if breakdown:
            write_csv(tmp / "breakdown.csv", breakdown)
        plot(rows, tmp)
    out = write_outputs(grid.out, rows, dataclasses.asdict(grid), report, extra)
    print(table + "\n\n" + detail)
    print(f"wrote {out}/results.csv, results.json, breakdown.csv, report.md, speed.png")
    return out
