"""Offload settings as values: a policy with its forecast, and an expert budget.

    parse_policy("lru")                      PolicySpec("lru")
    parse_policy("predictive:prior")         PolicySpec("predictive", "prior")   frequency prior
    parse_policy("predictive:oracle")        PolicySpec("predictive", "oracle")  recorded routing
    parse_policy("predictive:runs/rpp/code") PolicySpec("predictive", "runs/rpp/code")
                                             a trained routing-path predictor (its folder)
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


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    policy: str
    forecast: str | None = None      # "prior", "oracle" or a predictor folder (predictive only)

    @property
    def predictor(self) -> str | None:
        """The predictor folder, when the forecast is a trained predictor."""
        return self.forecast if self.forecast and self.forecast not in FORECASTS else None

    @property
    def label(self) -> str:
        """Name in result tables: the policy, and 'prior' / 'oracle' / 'rpp' for predictive."""
        if self.forecast is None:
            return self.policy
        return f"{self.policy}:{'rpp' if self.predictor else self.forecast}"

    def __str__(self) -> str:
        return self.policy if self.forecast is None else f"{self.policy}:{self.forecast}"


def parse_policy(text: str) -> PolicySpec:
    """'lru' -> PolicySpec('lru'); 'predictive:F' -> PolicySpec('predictive', F), F one of
    FORECASTS or a routing-path predictor folder (it must exist and hold rpp.json)."""
    name, sep, forecast = str(text).strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"policy {text!r}: unknown policy {name!r}; expected one of "
                         f"{', '.join(POLICIES)} (predictive as predictive:prior, "
                         "predictive:oracle or predictive:PREDICTOR_DIR)")
    if name != "predictive":
        if sep:
            raise ValueError(f"policy {text!r}: only predictive takes a forecast after ':'")
        return PolicySpec(name)
    if not forecast:
        raise ValueError(f"policy {text!r}: predictive takes a forecast: predictive:prior, "
                         "predictive:oracle or predictive:PREDICTOR_DIR")
    if forecast not in FORECASTS and not (pathlib.Path(forecast) / PREDICTOR_FILE).is_file():
        raise ValueError(f"policy {text!r}: {forecast!r} is neither a built-in forecast "
                         f"({', '.join(FORECASTS)}) nor a routing-path predictor folder (no "
                         f"{pathlib.Path(forecast) / PREDICTOR_FILE}; train one with "
                         "`moex predictor train`)")
    return PolicySpec(name, forecast)


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
