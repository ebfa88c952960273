"""Forecasters for the `predictive` policy, built from a policy spec (`moex.offload.spec`):

    make_forecaster(spec, reference, calibration)
        predictive:oracle   the routing `reference` recorded (same prompts, same batch)
        predictive:prior    the per-(layer, expert) frequencies of `calibration`
        predictive:DIR      the routing-path predictor saved in DIR (PredictorForecast)
    forecaster_for(spec, cfg, store, prompts, new_tokens)
        the same, recording what it needs: an all-resident reference run of the prompts
        (`moex.offload.forecast.reference_run`), whose trace serves as oracle and as prior

PredictorForecast serves the policy: at a request batch's prefill it runs the predictor once on
the prompts (before the first MoE layer) and keeps the per-position probabilities; a forward's
forecast is the probability that any of its tokens uses each expert
(`moex.offload.forecast.batch_probability`): the prompt positions at prefill, generated position
f - 1 at decode step f. Mispredictions are corrected at run time by the engine's demand loads.
For an encoder-decoder (a predictor with `encoder_moe_layers`) the prefill is the encoder pass
(tokens = the encoder input: the predictor's prompt) and decode step f runs the decoder on its
position f - 1 (0 = the start token); each forecast covers all MoE layers (L, E), with 0 in the
rows of the stack that forward does not run (the decoder's at the encoder pass, the encoder's at
a decoder step).

    make_lookahead(spec)       the lookahead heads a spec names (`lookahead:HEADS`,
                               `predictive:F+HEADS`), as LookaheadHints; None otherwise
"""

from __future__ import annotations

import numpy as np

from moex.offload.forecast import OracleForecast, PriorForecast, batch_probability
from moex.offload.seq2seq_engine import reference_for
from moex.offload.spec import PolicySpec
from moex.offload.trace import Trace
from moex.predict.lookahead import LookaheadHints
from moex.predict.model import RPPConfig
from moex.predict.train import load_predictor, predict


def make_forecaster(spec: PolicySpec, reference: Trace | None = None,
                    calibration: Trace | None = None):
    """The forecaster `spec` names (None for policies without one)."""
    if spec.forecast is None:
        return None
    if spec.predictor:
        return PredictorForecast(*load_predictor(spec.predictor))
    oracle = spec.forecast == "oracle"
    source = reference if oracle else calibration
    if source is None:
        raise ValueError(f"{spec}: needs a {'reference' if oracle else 'calibration'} trace (an "
                         "all-resident run: moex.offload.forecast.reference_run)")
    return OracleForecast(source) if oracle else PriorForecast.from_trace(source)


def make_lookahead(spec: PolicySpec):
    """The lookahead heads `spec` names, or None."""
    return LookaheadHints.load(spec.lookahead) if spec.lookahead else None


def forecaster_for(spec: PolicySpec, cfg, store, prompts, new_tokens: int):
    """make_forecaster for live use on `prompts` = (ids, mask, images or None): oracle and prior
    both come from one all-resident run of these prompts (run only when needed)."""
    if spec.forecast is None or spec.predictor:
        return make_forecaster(spec)
    trace = reference_for(cfg, store, *prompts, new_tokens=new_tokens).trace()
    return make_forecaster(spec, trace, trace)


class PredictorForecast:
    """Forecasts for the `predictive` policy from a routing-path predictor (see the docstring)."""

    name = "rpp"

    def __init__(self, rpp_cfg: RPPConfig, params):
        self.rpp_cfg, self.params = rpp_cfg, params
        self.probs = None                                  # (B, P + G, L, E) of the batch
        self.mask, self.start = None, 0                    # its prompt mask, prefill's index

    def check_model(self, cfg) -> None:
        self.rpp_cfg.check_model(cfg)

    def for_forward(self, index: int, tokens, token_mask, prefill: bool = True,
                    states=None) -> np.ndarray:
        tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
        in_encoder = self.rpp_cfg.in_encoder
        if in_encoder is not None:                         # encoder-decoder: one stack runs
            if not prefill and self.probs is None:
                raise ValueError("an encoder-decoder's first forward is its encoder pass "
                                 "(prefill=True, tokens = the encoder input); the forecaster "
                                 "was asked for a decoder step first")
            out = self._forecast(index, tokens, token_mask, prefill, states)
            out[~in_encoder if prefill else in_encoder] = 0.0
            return out
        return self._forecast(index, tokens, token_mask, prefill, states)

    def _forecast(self, index: int, tokens, token_mask, prefill: bool,
                  states) -> np.ndarray:
        if prefill or self.probs is None:
            # a prefill (a new request batch): one predictor forward for all its positions
            if self.rpp_cfg.state_width and states is None:
                raise ValueError("this routing-path predictor reads the first MoE layer's input "
                                 "states; the caller gave none")
            self.probs = predict(self.rpp_cfg, self.params, tokens, token_mask,
                                 states=np.asarray(states, np.float16)
                                 if self.rpp_cfg.state_width else None)
            self.mask, self.start = token_mask, index
            return batch_probability(self.probs[:, :tokens.shape[1]], token_mask)
        p = self.mask.shape[1]
        g = min(index - self.start - 1, self.rpp_cfg.gen_len - 1)
        return batch_probability(self.probs[:, p + g][:, None], np.asarray(token_mask))
