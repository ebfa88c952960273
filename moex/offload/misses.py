"""What a miss may do besides a full load, and the cost model that decides it per missed expert.

    spec = parse_misses("low:int4+upgrade+host")
    rule = MissRule(spec, MissCosts(link_bytes_per_s=25e9, link_latency_s=1e-5,
                                    host_seconds_per_row=2e-4, host_overhead_s=5e-5,
                                    stored_bytes=..., low_bytes=...))
    rule.decide(rows=3) -> "load" | "low" | "host"

A missed expert is, by default, copied whole (its stored copy) before its layer computes. Two
options, after HOBBIT (arXiv 2411.01433) and Fiddler (ICLR'25) / KTransformers / llama.cpp's
`--n-cpu-moe`:
  low      copy the expert's low-precision copy (int4 or int8, `moex.offload.quant`) instead, so
           the layer computes with it; with `upgrade`, the stored copy follows in the background
           (issued after the layer's compute, like a prefetch) and replaces it in the same slot.
  host     do not copy the expert: the host CPU runs it on the rows that picked it (their
           activations cross the link instead of the weights); it stays off the device -- or,
           with `fill`, its stored copy follows in the background (issued with the prefetches
           and counted as one), so the cache keeps learning what is hot while the host serves
           the miss.

The cost model: each option's time for this miss --
  load  link_latency + stored_bytes / link bandwidth
  low   link_latency + low_bytes / link bandwidth
  host  host_overhead + rows x host_seconds_per_row
-- and its stall, max(0, finish - hide_s), hide_s being the compute a copy overlaps (0 in the live
engine, whose rounds wait for their copies before computing). The link and the host are two
queues that work in parallel, so a visit's misses are assigned together (`assign`): largest
row count first, each to the option that finishes it soonest after the work already queued on
its resource in this visit (copies share the link; host experts run one after another) -- one
miss of a layer may cross the link while another runs on the host. On a tie the more precise
option wins (load, then host -- which computes the stored weights -- then low), so a miss that
would not stall is always loaded whole. The rule sees only the visit, never a clock, so the
live engine and the replay simulator make the same decisions. Counts: misses served at low
precision (`served_low`), on the host (`served_host`), and background `upgrades`; both served
counts are at most the misses.
"""

from __future__ import annotations

import dataclasses

from moex.offload.quant import QuantFormat, label as fmt_label, parse_expert_dtype

OPTIONS = ("load", "host", "low")          # tie order: most precise first


@dataclasses.dataclass(frozen=True)
class MissSpec:
    low: QuantFormat | None = None         # serve a stalling miss from this copy
    upgrade: bool = False                  # then load the stored copy in the background
    host: bool = False                     # or compute the missed expert on the host
    fill: bool = False                     # and then load it in the background

    @property
    def label(self) -> str:
        parts = ([f"low:{fmt_label(self.low)}"] if self.low else []) + \
            (["upgrade"] if self.upgrade else []) + (["host"] if self.host else []) + \
            (["fill"] if self.fill else [])
        return "+".join(parts) or "load"

    def __str__(self) -> str:
        return self.label

    @property
    def plain(self) -> bool:
        return self.low is None and not self.host


def parse_misses(text) -> MissSpec:
    """'load' (full copies only); 'low' (int4) or 'low:int8' / 'low:int4:32'; '+upgrade' after
    a low option; 'host', '+fill' after it; combined with '+', e.g. 'low:int4+upgrade+host'."""
    if isinstance(text, MissSpec):
        return text
    s = str(text or "load").strip().lower()
    low, upgrade, host, fill = None, False, False, False
    for part in s.split("+"):
        if part == "load" and s == "load":
            continue
        if part == "host":
            host = True
        elif part == "fill":
            fill = True
        elif part == "upgrade":
            upgrade = True
        elif part == "low" or part.startswith("low:"):
            low = parse_expert_dtype(part.partition(":")[2] or "int4")
            if low is None:
                raise ValueError(f"misses {text!r}: a low-precision copy must be int8 or int4")
        else:
            raise ValueError(f"misses {text!r}: unknown part {part!r}; expected load, or any of "
                             "low[:int4|int8|int4:G], upgrade (after low), host, fill (after "
                             "host) joined by '+'")
    if upgrade and low is None:
        raise ValueError(f"misses {text!r}: upgrade needs a low-precision copy (low+upgrade)")
    if fill and not host:
        raise ValueError(f"misses {text!r}: fill loads host-computed experts; use host+fill")
    return MissSpec(low, upgrade, host, fill)


@dataclasses.dataclass(frozen=True)
class MissCosts:
    link_bytes_per_s: float
    link_latency_s: float
    host_seconds_per_row: float            # one token through one expert on the host
    host_overhead_s: float                 # per host-computed expert (dispatch, activations)
    stored_bytes: int                      # one expert's stored copy
    low_bytes: int = 0                     # its low-precision copy
    hide_s: float = 0.0                    # compute a copy overlaps

    def seconds(self, option: str, rows: int) -> float:
        if option == "load":
            return self.link_latency_s + self.stored_bytes / self.link_bytes_per_s
        if option == "low":
            return self.link_latency_s + self.low_bytes / self.link_bytes_per_s
        if option == "host":
            return self.host_overhead_s + rows * self.host_seconds_per_row
        raise ValueError(f"unknown miss option {option!r}; expected one of {OPTIONS}")

    def stall(self, option: str, rows: int) -> float:
        return max(0.0, self.seconds(option, rows) - self.hide_s)


@dataclasses.dataclass(frozen=True)
class MissRule:
    spec: MissSpec
    costs: MissCosts

    def __post_init__(self):
        if self.spec.low is not None and self.costs.low_bytes <= 0:
            raise ValueError(f"misses {self.spec}: the cost model has no low-precision copy "
                             "size (low_bytes); build the store with that low dtype")

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(o for o in OPTIONS if o == "load" or (o == "host" and self.spec.host)
                     or (o == "low" and self.spec.low is not None))

    def decide(self, rows: int) -> str:
        """The option for one missed expert that `rows` token-expert pairs need."""
        return self.assign({0: rows})[0]

    def assign(self, rows: dict) -> dict:
        """{missed expert: rows} of one visit -> {expert: option} (see the module docstring)."""
        queued = {"link": 0.0, "host": 0.0}
        out = {}
        for expert in sorted(rows, key=lambda e: (-rows[e], e)):
            best = None
            for i, option in enumerate(self.options):
                queue = "host" if option == "host" else "link"
                finish = queued[queue] + self.costs.seconds(option, rows[expert])
                cand = (max(0.0, finish - self.costs.hide_s), i, option, queue, finish)
                best = cand if best is None or cand[:2] < best[:2] else best
            out[expert] = best[2]
            queued[best[3]] = best[4]
        return out
