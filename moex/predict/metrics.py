"""Prediction quality of expert routes, and the baselines every predictor is judged against.

Shape letters: N positions, L MoE layers, E experts; a prediction is a score (N, L, E) (higher =
more likely), the truth a multi-hot (N, L, E), `mask` (N,) marks the positions that count.

  topk_recall     per layer: |top-k predicted ∩ true| / |true| per position, averaged (k = the
                  model's top-k, so recall = precision at k)
  precision / recall at threshold 0.5 (predicted set = score >= 0.5)
  batch_acc (B_acc, ExpertFlow): positions are taken in consecutive batches of b; per batch and
                  layer, R_true = OR of the true routes, R_pred = OR of each position's top-k;
                  B_acc = mean over batches of |R_pred ∩ R_true| / |R_true|, per layer
  wasted          per batch size: |R_pred \\ R_true| / |R_pred| -- prefetches that go unused

Baselines, as score arrays over the same positions (`baselines`):
  prior   every position gets the training trace's per-layer expert frequency
  tlp     previous token: the true routes of the request's previous position (first: prior)
  slp     previous layer: the true routes of the same position one MoE layer earlier (layer 0:
          prior) -- needs the runtime routing, so it is not available at admission
  pregate the experts layer l's router picks from layer l-1's hidden state (from the trace;
          layer 0: prior)
"""

from __future__ import annotations

import numpy as np
from moex.predict.data import examples

BATCH_SIZES = (1, 4, 16, 32)


def topk_sets(scores: np.ndarray, k: int) -> np.ndarray:
    """Multi-hot (N, L, E) of the k highest scores per (position, layer); ties to lower ids."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    out = np.zeros(scores.shape, bool)
    np.put_along_axis(out, order, True, axis=-1)
    return out


def _per_layer(num, den):
    return num / np.maximum(den, 1)


def evaluate(scores, truth, mask, k: int, batch_sizes=BATCH_SIZES, defined=None) -> dict:
    """Metrics per layer (lists) and their means; see the module docstring. `defined` (L,) bool:
    the layers the method predicts (pre-gate and SLP have no layer 0, a lookahead head at
    offset o no layer below o); the others are None in the lists and left out of the means."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    keep = np.asarray(mask, bool)
    scores, truth = scores[keep], truth[keep]
    defined = np.ones(truth.shape[1], bool) if defined is None else np.asarray(defined, bool)
    pred = topk_sets(scores, k)
    hit = (pred & truth).sum(-1)                                    # (N, L)
    topk_recall = (hit / np.maximum(truth.sum(-1), 1)).mean(0) if len(truth) else \
        np.zeros(truth.shape[1])
    thresh = scores >= 0.5
    tp = (thresh & truth).sum((0, 2))
    out = {"topk_recall": topk_recall,
           "precision": _per_layer(tp, thresh.sum((0, 2))),
           "recall": _per_layer(tp, truth.sum((0, 2)))}
    for b in batch_sizes:
        out[f"b_acc_{b}"], out[f"wasted_{b}"] = batch_acc(pred, truth, b)
    means = {f"mean_{name}": float(np.mean(v[defined])) if defined.any() else None
             for name, v in out.items()}
    out = {name: [float(x) if d else None for x, d in zip(v, defined)] for name, v in out.items()}
    return {**out, **means, "positions": int(keep.sum())}


def batch_acc(pred: np.ndarray, truth: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(B_acc per layer, wasted fraction per layer) over consecutive batches of b positions
    (a last partial batch counts too)."""
    accs, wastes = [np.zeros(pred.shape[1])], [np.zeros(pred.shape[1])]
    if len(pred):
        accs, wastes = [], []
    for s in range(0, len(pred), b):
        rp, rt = pred[s:s + b].any(0), truth[s:s + b].any(0)            # (L, E)
        inter = (rp & rt).sum(-1)
        accs.append(inter / np.maximum(rt.sum(-1), 1))
        wastes.append((rp & ~rt).sum(-1) / np.maximum(rp.sum(-1), 1))
    return np.mean(accs, 0), np.mean(wastes, 0)


def frequency_prior(routes, mask) -> np.ndarray:
    """(L, E) fraction of counted positions that used each expert."""
    r = np.asarray(routes, bool)[np.asarray(mask, bool)]
    return r.mean(0) if len(r) else np.zeros(r.shape[1:])


def baselines(ex, prior: np.ndarray, pregate=None) -> dict:
    """Score arrays (R, P + G, L, E) for the baselines over Examples `ex` (see the docstring).
    pregate: optional (R, P + G, L, E) multi-hot of pre-gate predictions."""
    routes = ex.routes.astype(np.float64)
    base = np.broadcast_to(prior, routes.shape).copy()
    tlp = base.copy()
    prev_ok = (ex.route_mask[:, :-1] > 0)[..., None, None]
    tlp[:, 1:] = np.where(prev_ok, routes[:, :-1], base[:, 1:])
    slp = base.copy()
    slp[:, :, 1:] = routes[:, :, :-1]
    out = {"prior": base, "tlp": tlp, "slp": slp}
    if pregate is not None:
        pg = base.copy()
        pg[:, :, 1:] = np.asarray(pregate, np.float64)[:, :, 1:]
        out["pregate"] = pg
    return out


def pregate_routes(trace, ex) -> np.ndarray | None:
    """(R, P + G, L, E) multi-hot of the trace's pre-gate predictions, aligned with `ex`."""
    if trace.pregate is None:
        return None
    import dataclasses
    swapped = dataclasses.replace(trace, experts=np.maximum(trace.pregate, 0))
    got = examples(swapped, ex.routes.shape[1] - ex.tokens.shape[1])
    out = got.routes.copy()
    out[:, :, 0] = False                                  # layer 0 has no pre-gate
    return out
