"""Every predictor and every baseline on the same trace files: per-layer and mean metrics
(`moex.predict.metrics`) over all positions, over generated positions only, and per request
category where the trace names one (VLM prompts) -- in-domain and cross-domain when the traces
come from two domains.

Methods: rpp (a routing-path predictor, at admission), lookahead_dO / preattn_dO (lookahead heads
at offset O, post- and pre-attention; `moex.predict.lookahead`), pregate, tlp, slp, prior.

Encoder-decoder traces: the prompt is the encoder input and the generated positions are the
decoder's; every metric counts a position only in the layers it ran (`Examples.layer_mask`), so
"generated" holds the decoder's layers only (the encoder's are n/a), and SLP / pre-gate are
undefined at the first MoE layer of each stack.
"""

from __future__ import annotations

import pathlib

import numpy as np

from moex.offload.trace import Trace
from moex.predict.data import examples, on_grid
from moex.predict.lookahead import SOURCES, head_probabilities, layer_scores, load_heads
from moex.predict.metrics import baselines, evaluate, frequency_prior, pregate_routes
from moex.predict.train import load_predictor, predict

PREFIX = {"post-attention": "lookahead", "pre-attention": "preattn"}


def _flat(a):
    return a.reshape(-1, *a.shape[2:])


def method_scores(trace: Trace, ex, prior: np.ndarray, rpp=None, heads=()) -> dict:
    """{method: (scores (R, P + G, L, E), defined layers (L,) bool)} on `ex`'s grid.
    rpp: (RPPConfig, params) or None; heads: [(LookaheadConfig, params)]."""
    everywhere = np.ones(ex.num_layers, bool)
    from_layer_1 = ~ex.first_in_stack              # a previous MoE layer in the same stack
    out = {}
    if rpp is not None:
        out["rpp"] = (predict(*rpp, ex.tokens, ex.mask, states=ex.states), everywhere)
    for cfg, params in heads:
        cfg.check_trace(trace)
        probs = head_probabilities(cfg, params, getattr(trace, SOURCES[cfg.source]))
        for o in cfg.offsets:
            scores, defined = layer_scores(cfg, probs, o, prior)
            out[f"{PREFIX[cfg.source]}_d{o}"] = (on_grid(ex, scores, prior), defined)
    for name, scores in baselines(ex, prior, pregate_routes(trace, ex)).items():
        out[name] = (scores, from_layer_1 if name in ("pregate", "slp") else everywhere)
    return out


def _layer_mask(ex, index=slice(None)):
    """The flat (N, L) layer mask `metrics.evaluate` takes: None for a decoder LM (every position
    runs every layer)."""
    return _flat(ex.layer_mask[index]) if ex.is_encdec else None


def evaluate_predictors(traces, prior_trace, predictor=None, heads=(), gen_len: int = 16) -> dict:
    """{trace file: {method: metrics}} for a routing-path predictor (folder), lookahead head
    sets (folders) and the baselines, on all positions ("traces"), generated positions only
    ("generated") and per request category ("categories", top-k recall)."""
    rpp = load_predictor(predictor) if predictor else None
    if rpp is not None:
        gen_len = rpp[0].gen_len
    head_sets = [load_heads(h) for h in heads]
    prior_ex = examples(Trace.load(prior_trace), gen_len)
    prior = frequency_prior(_flat(prior_ex.routes), _flat(prior_ex.route_mask),
                            _layer_mask(prior_ex))
    report = {"predictor": str(predictor) if predictor else None,
              "heads": [str(h) for h in heads], "prior_trace": str(prior_trace),
              "traces": {}, "generated": {}, "categories": {}}
    for path in traces:
        trace = Trace.load(path)
        shape = (len(trace.moe_layers), trace.num_experts)
        if rpp is not None and shape != (rpp[0].num_layers, rpp[0].num_experts):
            raise ValueError(f"{path}: trace has (L, E) = {shape}, the predictor "
                             f"({rpp[0].num_layers}, {rpp[0].num_experts})")
        ex = examples(trace, gen_len, rpp[0].max_prompt if rpp else None,
                      states=bool(rpp and rpp[0].state_width))
        enc = None if ex.in_encoder is None else int(ex.in_encoder.sum())
        if rpp is not None and enc != rpp[0].encoder_moe_layers:
            raise ValueError(f"{path}: trace has {enc} encoder MoE layers (None: a decoder "
                             f"LM), the predictor {rpp[0].encoder_moe_layers}")
        scores = method_scores(trace, ex, prior, rpp, head_sets)
        truth, k = _flat(ex.routes), trace.top_k
        generated = np.zeros_like(ex.route_mask)
        generated[:, ex.tokens.shape[1]:] = ex.route_mask[:, ex.tokens.shape[1]:]
        name = pathlib.Path(path).name
        for key, mask in (("traces", ex.route_mask), ("generated", generated)):
            report[key][name] = {m: evaluate(_flat(s), truth, _flat(mask), k, defined=d,
                                             layer_mask=_layer_mask(ex))
                                 for m, (s, d) in scores.items()}
        if trace.request_labels:
            labels = np.asarray(trace.request_labels)[ex.requests]
            report["categories"][name] = {
                m: {str(c): evaluate(_flat(s[labels == c]), _flat(ex.routes[labels == c]),
                                     _flat(ex.route_mask[labels == c]), k, batch_sizes=(),
                                     defined=d, layer_mask=_layer_mask(ex, labels == c)
                                     )["mean_topk_recall"]
                    for c in sorted(set(labels))}
                for m, (s, d) in scores.items()}
    return report


def evaluate_predictor(predictor, traces, prior_trace, heads=()) -> dict:
    """`evaluate_predictors` for one routing-path predictor (and optional heads)."""
    return evaluate_predictors(traces, prior_trace, predictor, heads)


def _cell(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    lines = [f"Predictor {report['predictor']}, heads {report.get('heads') or 'none'} (prior "
             f"from {report['prior_trace']}); means over the layers a method predicts (n/a: "
             "none), per-layer top-k recall from the first MoE layer", ""]
    for name, methods in report["traces"].items():
        lines += [f"### {name}: all positions", "",
                  "| method | top-k recall | precision@0.5 | recall@0.5 | B_acc 1 | B_acc 4 "
                  "| B_acc 16 | B_acc 32 | wasted 4 | wasted 16 | top-k recall per layer |",
                  "|" + "---|" * 11]
        for method, m in methods.items():
            per_layer = " ".join(_cell(x, "{:.2f}") for x in m["topk_recall"])
            lines.append(
                f"| {method} | {_cell(m['mean_topk_recall'])} | {_cell(m['mean_precision'])} "
                f"| {_cell(m['mean_recall'])} | {_cell(m['mean_b_acc_1'])} "
                f"| {_cell(m['mean_b_acc_4'])} | {_cell(m['mean_b_acc_16'])} "
                f"| {_cell(m['mean_b_acc_32'])} | {_cell(m['mean_wasted_4'])} "
                f"| {_cell(m['mean_wasted_16'])} | {per_layer} |")
        gen = report.get("generated", {}).get(name)
        if gen:
            count = next(iter(gen.values()))["positions"]
            lines += ["", f"Generated positions only ({count}):", "",
                      "| method | top-k recall | B_acc 4 | top-k recall per layer |", "|---|---|---|---|"]
            for method, m in gen.items():
                per_layer = " ".join(_cell(x, "{:.2f}") for x in m["topk_recall"])
                lines.append(f"| {method} | {_cell(m['mean_topk_recall'])} "
                             f"| {_cell(m['mean_b_acc_4'])} | {per_layer} |")
        cats = report.get("categories", {}).get(name)
        if cats:
            names = list(next(iter(cats.values())))
            lines += ["", "Top-k recall per request category:", "",
                      "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for method, per in cats.items():
                lines.append(f"| {method} | " + " | ".join(_cell(per[c]) for c in names) + " |")
        lines.append("")
    return "\n".join(lines)
