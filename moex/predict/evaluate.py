"""The predictor and every baseline on the same trace files: per-layer and mean metrics
(`moex.predict.metrics`) -- in-domain and cross-domain when the traces come from two domains."""

from __future__ import annotations

import pathlib

from moex.offload.trace import Trace
from moex.predict.data import examples
from moex.predict.metrics import baselines, evaluate, frequency_prior, pregate_routes
from moex.predict.train import load_predictor, predict


def _flat(a):
    return a.reshape(-1, *a.shape[2:])


def evaluate_predictor(predictor, traces, prior_trace) -> dict:
    """{trace file: {method: metrics}} for the predictor ('rpp') and the baselines."""
    rpp_cfg, params = load_predictor(predictor)
    prior_ex = examples(Trace.load(prior_trace), rpp_cfg.gen_len)
    prior = frequency_prior(_flat(prior_ex.routes), _flat(prior_ex.route_mask))
    report = {"predictor": str(predictor), "prior_trace": str(prior_trace), "traces": {}}
    for path in traces:
        trace = Trace.load(path)
        if (len(trace.moe_layers), trace.num_experts) != (rpp_cfg.num_layers, rpp_cfg.num_experts):
            raise ValueError(f"{path}: trace has (L, E) = ({len(trace.moe_layers)}, "
                             f"{trace.num_experts}), the predictor ({rpp_cfg.num_layers}, "
                             f"{rpp_cfg.num_experts})")
        ex = examples(trace, rpp_cfg.gen_len, rpp_cfg.max_prompt)
        scores = {"rpp": predict(rpp_cfg, params, ex.tokens, ex.mask)}
        scores.update(baselines(ex, prior, pregate_routes(trace, ex)))
        truth, mask = _flat(ex.routes), _flat(ex.route_mask)
        report["traces"][pathlib.Path(path).name] = {
            name: evaluate(_flat(s), truth, mask, rpp_cfg.top_k) for name, s in scores.items()}
    return report


def markdown(report: dict) -> str:
    lines = [f"Predictor {report['predictor']} (prior from {report['prior_trace']})", ""]
    for name, methods in report["traces"].items():
        lines += [f"### {name}", "",
                  "| method | top-k recall | precision@0.5 | recall@0.5 | B_acc 1 | B_acc 4 "
                  "| B_acc 16 | B_acc 32 | wasted 16 | top-k recall per layer |",
                  "|" + "---|" * 10]
        for method, m in methods.items():
            per_layer = " ".join(f"{x:.2f}" for x in m["topk_recall"])
            lines.append(
                f"| {method} | {m['mean_topk_recall']:.3f} | {m['mean_precision']:.3f} "
                f"| {m['mean_recall']:.3f} | {m['mean_b_acc_1']:.3f} | {m['mean_b_acc_4']:.3f} "
                f"| {m['mean_b_acc_16']:.3f} | {m['mean_b_acc_32']:.3f} "
                f"| {m['mean_wasted_16']:.3f} | {per_layer} |")
        lines.append("")
    return "\n".join(lines)

