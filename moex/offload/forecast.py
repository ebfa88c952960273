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

Encoder-decoder traces (`Trace.is_encdec`): a forward runs one stack (the encoder pass or a
decoder step), and the forecast's rows of the other stack's MoE layers are 0. A trace's -1
entries (a layer the row did not run) are no expert; the prior's frequency of a layer is among
the rows that ran it, and a batch of n tokens counts in the layers of the stack it runs.
"""

from __future__ import annotations

import numpy as np

from moex.config import EncDecConfig
from moex.offload.engine import OffloadEngine
from moex.offload.store import expert_moe, moe_layers
from moex.offload.trace import Trace


def batch_probability(token_probs, token_mask=None) -> np.ndarray:
    """Per-token probabilities (B, T, L, E) -> probability any valid token uses the expert (L, E)."""
    p = np.asarray(token_probs, np.float64)
    if token_mask is not None:
        p = p * np.asarray(token_mask, bool)[..., None, None]
    return 1.0 - np.prod(1.0 - p.reshape(-1, *p.shape[-2:]), axis=0)


def used_experts(trace: Trace, rows) -> np.ndarray:
    """(L, E) with 1.0 where one of `rows` picked the expert (-1 entries: none)."""
    out = np.zeros((len(trace.moe_layers), trace.num_experts))
    for li in range(len(trace.moe_layers)):
        ids = np.unique(trace.experts[rows, li])
        out[li, ids[ids >= 0]] = 1.0
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

    def __init__(self, token_freq: np.ndarray, in_encoder=None):
        self.token_freq = np.asarray(token_freq, np.float64)         # (L, E)
        # (L,) bool: an encoder-decoder's encoder MoE layers; None for a decoder LM
        self.in_encoder = None if in_encoder is None else np.asarray(in_encoder, bool)

    def check_model(self, cfg) -> None:
        want = (len(moe_layers(cfg)), expert_moe(cfg).num_experts)
        if self.token_freq.shape != want:
            raise ValueError(f"prior of shape {self.token_freq.shape} does not match {cfg.name}: "
                             f"expected (MoE layers, experts) = {want}")
        in_encoder = np.asarray(moe_layers(cfg)) < cfg.encoder_layers \
            if isinstance(cfg, EncDecConfig) else None
        if (in_encoder is None) != (self.in_encoder is None) or (
                in_encoder is not None and (in_encoder != self.in_encoder).any()):
            show = lambda m: "none (a decoder LM)" if m is None else np.flatnonzero(m).tolist()
            raise ValueError(f"prior does not match {cfg.name}: its encoder MoE layers are "
                             f"{show(self.in_encoder)}, the model's {show(in_encoder)}; "
                             f"calibrate it on a trace of {cfg.name}")

    @classmethod
    def from_trace(cls, trace: Trace) -> "PriorForecast":
        freq = np.zeros((len(trace.moe_layers), trace.num_experts))
        if trace.is_encdec:
            ran = trace.layer_mask().sum(0)                          # (L,) rows per layer
            for li in range(len(trace.moe_layers)):
                ids = trace.experts[:, li].ravel()
                freq[li] = np.bincount(ids[ids >= 0], minlength=trace.num_experts)
            return cls(freq / np.maximum(ran, 1)[:, None],
                       np.asarray(trace.moe_layers) < trace.encoder_layers)
        for li in range(len(trace.moe_layers)):
            for k in range(trace.top_k):
                freq[li] += np.bincount(trace.experts[:, li, k], minlength=trace.num_experts)
        return cls(freq / max(len(trace), 1))

    def _for(self, n) -> np.ndarray:
        """n: tokens of the forward, an int or per layer (L,) (0 where a layer does not run)."""
        n = n if np.ndim(n) == 0 else np.asarray(n)[:, None]
        return 1.0 - (1.0 - np.clip(self.token_freq, 0.0, 1.0)) ** n

    def for_rows(self, trace: Trace, rows) -> np.ndarray:
        if self.in_encoder is not None:
            return self._for(trace.layer_mask()[rows].sum(0))
        return self._for(len(rows))

    def for_forward(self, index: int, tokens=None, token_mask=None, prefill=True,
                    states=None) -> np.ndarray:
        n = int(np.asarray(token_mask).sum())
        if self.in_encoder is not None:     # the encoder pass runs the encoder, a step the decoder
            return self._for(np.where(self.in_encoder == bool(prefill), n, 0))
        return self._for(n)



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
