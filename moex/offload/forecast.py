"""Forecasters for the `predictive` policy: at a forward's admission, the probability that the
forward's batch uses each expert of each MoE layer, (L_moe, E).

Two entry points, one per consumer:
  for_rows(trace, rows)                   replay: the forward that ran these trace rows
  for_forward(index, tokens, token_mask, prefill, states)
                                          live engine: forward `index` of the engine (0 = its
                                          first prefill, then decode steps) on tokens (B, T)
                                          with token_mask (B, T); prefill: a new request batch;
                                          states: the first MoE layer's input (B, T, D)

  OracleForecast  the routing a reference run recorded (1 for each used expert, else 0): a
                  perfect predictor, the ceiling of prediction. Live use needs the same requests
                  and batch as the recording (routing is deterministic).
  PriorForecast   per-(layer, expert) token frequencies from a calibration trace; a batch of n
                  tokens uses expert e with probability 1 - (1 - p)^n. The frequency-prior baseline.
A learned routing-path predictor gives per-token probabilities; `batch_probability` turns them
into a forecast.
"""

from __future__ import annotations

import numpy as np

from moex.offload.engine import OffloadEngine
from moex.offload.store import moe_layers
from moex.offload.trace import Trace


def batch_probability(token_probs, token_mask=None) -> np.ndarray:
    """Per-token probabilities (B, T, L, E) -> probability any valid token uses the expert (L, E)."""
    p = np.asarray(token_probs, np.float64)
    if token_mask is not None:
        p = p * np.asarray(token_mask, bool)[..., None, None]
    return 1.0 - np.prod(1.0 - p.reshape(-1, *p.shape[-2:]), axis=0)


def used_experts(trace: Trace, rows) -> np.ndarray:
    """(L, E) with 1.0 where one of `rows` picked the expert."""
    out = np.zeros((len(trace.moe_layers), trace.num_experts))
    for li in range(len(trace.moe_layers)):
        out[li, np.unique(trace.experts[rows, li])] = 1.0
    return out


class OracleForecast:
    name = "oracle"

    def __init__(self, trace: Trace):
        self.trace = trace

    def check_model(self, cfg) -> None:
        self.trace.check_model(cfg, "the oracle's trace")

    def for_rows(self, trace: Trace, rows) -> np.ndarray:
        return used_experts(trace, rows)

    def for_forward(self, index: int, tokens=None, token_mask=None, prefill=True,
                    states=None) -> np.ndarray:
        rows = np.flatnonzero(self.trace.forward == index)
        if len(rows) == 0:
            raise ValueError(f"the oracle's trace has no forward {index} (it recorded "
                             f"{int(self.trace.forward.max()) + 1}); run the same requests")
        return used_experts(self.trace, rows)


class PriorForecast:
    name = "prior"

    def __init__(self, token_freq: np.ndarray):
        self.token_freq = np.asarray(token_freq, np.float64)         # (L, E)

    def check_model(self, cfg) -> None:
        want = (len(moe_layers(cfg)), cfg.decoder.moe.num_experts)
        if self.token_freq.shape != want:
            raise ValueError(f"prior of shape {self.token_freq.shape} does not match {cfg.name}: "
                             f"expected (MoE layers, experts) = {want}")

    @classmethod
    def from_trace(cls, trace: Trace) -> "PriorForecast":
        freq = np.zeros((len(trace.moe_layers), trace.num_experts))
        for li in range(len(trace.moe_layers)):
            for k in range(trace.top_k):
                freq[li] += np.bincount(trace.experts[:, li, k], minlength=trace.num_experts)
        return cls(freq / max(len(trace), 1))

    def _for(self, n: int) -> np.ndarray:
        return 1.0 - (1.0 - np.clip(self.token_freq, 0.0, 1.0)) ** n

    def for_rows(self, trace: Trace, rows) -> np.ndarray:
        return self._for(len(rows))

    def for_forward(self, index: int, tokens=None, token_mask=None, prefill=True,
                    states=None) -> np.ndarray:
        return self._for(int(np.asarray(token_mask).sum()))



def reference_run(cfg, store, tokens, token_mask, images=None, *, new_tokens: int,
                  request_ids=None, record_hidden: bool = False):
    """The all-resident engine after one greedy generate of the prompts (no stop token): its
    `trace()` is their routing (the oracle's source, a prior's calibration, a study's trace;
    with `record_hidden` also the hidden states the lookahead heads train on) and its
    `timings` the baseline's."""
    engine = OffloadEngine(cfg, None, "all-resident", store.total_bytes, store=store,
                           record_hidden=record_hidden)
    engine.generate(tokens, token_mask, images, max_new_tokens=new_tokens, stop_tokens=(),
                    request_ids=request_ids)
    return engine
