"""Offload settings as values: a policy with its forecast, and an expert budget.

    parse_policy("lru")                      PolicySpec("lru")
    parse_policy("predictive:prior")         PolicySpec("predictive", "prior")   frequency prior
    parse_policy("predictive:oracle")        PolicySpec("predictive", "oracle")  recorded routing
    parse_policy("predictive:runs/rpp/code") PolicySpec("predictive", "runs/rpp/code")
                                             a trained routing-path predictor (its folder)
    parse_policy("lookahead:runs/heads/code") PolicySpec("lookahead", None, "runs/heads/code")
                                             prefetch by trained lookahead heads (their folder)
    parse_policy("predictive:runs/rpp/code+runs/heads/code")
                                             the combined policy: the predictor's quotas and
                                             plan at admission, the heads' prefetch per layer
    parse_budget("25%", total_bytes)         bytes: '25%', '0.25' (of all expert bytes) or
                                             '64MB', '1.5GiB', '123456'
    budget_slots(budget_bytes, expert_bytes) whole experts that fit: the slot pool's size

Every command reads these strings here, so one string means one thing everywhere. The
forecasters themselves are built by `moex.predict.forecast.make_forecaster` (a predictor folder
needs the predictor package, which sits above this one).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from moex.offload.policies import POLICIES

FORECASTS = ("prior", "oracle")      # built in; anything else names a predictor folder
PREDICTOR_FILE = "rpp.json"          # what marks a routing-path predictor folder
HEADS_FILE = "lookahead.json"        # what marks a lookahead head-set folder


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    policy: str
    forecast: str | None = None      # "prior", "oracle" or a predictor folder (predictive only)
    lookahead: str | None = None     # a lookahead head-set folder (lookahead; predictive: combined)

    @property
    def predictor(self) -> str | None:
        """The predictor folder, when the forecast is a trained predictor."""
        return self.forecast if self.forecast and self.forecast not in FORECASTS else None

    @property
    def label(self) -> str:
        """Name in result tables: the policy, 'prior' / 'oracle' / 'rpp' for predictive, and
        '+lookahead' for the combined policy."""
        if self.forecast is None:
            return self.policy
        heads = "+lookahead" if self.lookahead else ""
        return f"{self.policy}:{'rpp' if self.predictor else self.forecast}{heads}"

    def __str__(self) -> str:
        if self.policy == "lookahead":
            return f"lookahead:{self.lookahead}"
        if self.forecast is None:
            return self.policy
        return f"{self.policy}:{self.forecast}" + (f"+{self.lookahead}" if self.lookahead else "")


def _heads_folder(text: str, folder: str) -> str:
    if not (pathlib.Path(folder) / HEADS_FILE).is_file():
        raise ValueError(f"policy {text!r}: {folder!r} is not a lookahead head-set folder (no "
                         f"{pathlib.Path(folder) / HEADS_FILE}; train one with `moex predictor "
                         "train --kind lookahead`)")
    return folder


def parse_policy(text: str) -> PolicySpec:
    """'lru' -> PolicySpec('lru'); 'predictive:F' -> PolicySpec('predictive', F), F one of
    FORECASTS or a routing-path predictor folder (it must exist and hold rpp.json);
    'predictive:F+HEADS' adds a lookahead head-set folder (the combined policy);
    'lookahead:HEADS' -> PolicySpec('lookahead', None, HEADS)."""
    name, sep, forecast = str(text).strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"policy {text!r}: unknown policy {name!r}; expected one of "
                         f"{', '.join(POLICIES)} (predictive as predictive:prior, "
                         "predictive:oracle or predictive:PREDICTOR_DIR, each optionally "
                         "+HEADS_DIR; lookahead as lookahead:HEADS_DIR)")
    if name == "lookahead":
        if not forecast:
            raise ValueError(f"policy {text!r}: lookahead takes its heads' folder: "
                             "lookahead:HEADS_DIR")
        return PolicySpec(name, None, _heads_folder(text, forecast))
    if name != "predictive":
        if sep:
            raise ValueError(f"policy {text!r}: only predictive takes a forecast after ':'")
        return PolicySpec(name)
    if not forecast:
        raise ValueError(f"policy {text!r}: predictive takes a forecast: predictive:prior, "
                         "predictive:oracle or predictive:PREDICTOR_DIR")
    forecast, plus, heads = forecast.partition("+")
    heads = _heads_folder(text, heads) if plus else None
    if forecast not in FORECASTS and not (pathlib.Path(forecast) / PREDICTOR_FILE).is_file():
        raise ValueError(f"policy {text!r}: {forecast!r} is neither a built-in forecast "
                         f"({', '.join(FORECASTS)}) nor a routing-path predictor folder (no "
                         f"{pathlib.Path(forecast) / PREDICTOR_FILE}; train one with "
                         "`moex predictor train`)")
    return PolicySpec(name, forecast, heads)


def parse_budget(text: str, total_bytes: int) -> int:
    """'25%' or '0.25' (a fraction of all expert bytes), or bytes: '64MB', '1.5GiB', '123456'."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9.]+)\s*(%|[kKmMgGtT]i?[bB]|[bB])?", s)
    if not m:
        raise ValueError(f"expert budget {text!r}: expected a percentage ('25%'), a fraction "
                         "('0.25') or bytes ('64MB', '1.5GiB')")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%" or (unit is None and value <= 1):
        fraction = value / 100 if unit == "%" else value
        if not 0 < fraction <= 1:
            raise ValueError(f"expert budget {text!r}: a fraction must be in (0, 1]")
        return int(fraction * total_bytes)
    if unit is None or unit.lower() == "b":
        return int(value)
    scale = 1024 if "i" in unit.lower() else 1000
    return int(value * scale ** "kmgt".index(unit[0].lower()) * scale)


def budget_slots(budget_bytes: int, expert_bytes: int) -> int:
    """How many experts a budget holds (whole experts: the slot pool's size)."""
    return int(budget_bytes // expert_bytes)
