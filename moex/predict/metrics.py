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

Encoder-decoder examples: a `layer_mask` (N, L) says which layers each position ran (encoder
positions the encoder's MoE layers, decoder positions the decoder's); every metric of layer l
counts only the positions that ran it (B_acc's batches are cut from those positions, in order),
and a layer no counted position ran is left undefined (None). Without a layer_mask every
position counts in every layer (a decoder LM).

Baselines, as score arrays over the same positions (`baselines`):
  prior   every position gets the training trace's per-layer expert frequency (for an
          encoder-decoder, among the positions that ran the layer)
  tlp     previous token: the true routes of the request's previous position (first: prior)
  slp     previous layer: the true routes of the same position one MoE layer earlier (layer 0:
          prior) -- needs the runtime routing, so it is not available at admission
  pregate the experts layer l's router picks from layer l-1's hidden state (from the trace;
          layer 0: prior)
None crosses an encoder-decoder's encoder/decoder boundary: TLP's previous token must have run
the same layer (the first decoder position, the start token, gets the prior: the last encoder
token ran other layers), and SLP and pre-gate have no source at the first MoE layer of each stack
(prior there; those layers are left out of their means, as layer 0 is).
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


def evaluate(scores, truth, mask, k: int, batch_sizes=BATCH_SIZES, defined=None,
             layer_mask=None) -> dict:
    """Metrics per layer (lists) and their means; see the module docstring. `defined` (L,) bool:
    the layers the method predicts (pre-gate and SLP have no layer 0, a lookahead head at
    offset o no layer below o); the others are None in the lists and left out of the means.
    `layer_mask` (N, L) bool: position n counts in layer l only where True (None: everywhere);
    layers no counted position ran are then undefined too."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    keep = np.asarray(mask, bool)
    scores, truth = scores[keep], truth[keep]
    defined = np.ones(truth.shape[1], bool) if defined is None else np.asarray(defined, bool)
    pred = topk_sets(scores, k)
    hit = (pred & truth).sum(-1)                                    # (N, L)
    if layer_mask is None:
        topk_recall = (hit / np.maximum(truth.sum(-1), 1)).mean(0) if len(truth) else \
            np.zeros(truth.shape[1])
        thresh = scores >= 0.5
    else:
        lm = np.asarray(layer_mask, bool)[keep]                      # (N, L)
        ran = lm.sum(0)
        topk_recall = (hit / np.maximum(truth.sum(-1), 1) * lm).sum(0) / np.maximum(ran, 1)
        defined = defined & (ran > 0)
        thresh, truth = (scores >= 0.5) & lm[..., None], truth & lm[..., None]
        pred = pred & lm[..., None]
    tp = (thresh & truth).sum((0, 2))
    out = {"topk_recall": topk_recall,
           "precision": _per_layer(tp, thresh.sum((0, 2))),
           "recall": _per_layer(tp, truth.sum((0, 2)))}
    for b in batch_sizes:
        out[f"b_acc_{b}"], out[f"wasted_{b}"] = batch_acc(pred, truth, b, layer_mask=None
                                                          if layer_mask is None else lm)
    means = {f"mean_{name}": float(np.mean(v[defined])) if defined.any() else None
             for name, v in out.items()}
    out = {name: [float(x) if d else None for x, d in zip(v, defined)] for name, v in out.items()}
    return {**out, **means, "positions": int(keep.sum())}


def batch_acc(pred: np.ndarray, truth: np.ndarray, b: int,
              layer_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(B_acc per layer, wasted fraction per layer) over consecutive batches of b positions
    (a last partial batch counts too); with `layer_mask` (N, L) bool, layer l's batches are cut
    from the positions that ran it (layers sharing a mask column share batches)."""
    if layer_mask is not None:
        lm = np.asarray(layer_mask, bool)
        acc, waste = np.zeros(pred.shape[1]), np.zeros(pred.shape[1])
        columns, group = np.unique(lm.T, axis=0, return_inverse=True)
        for g, column in enumerate(columns):
            layers = np.flatnonzero(group.ravel() == g)
            acc[layers], waste[layers] = batch_acc(pred[column][:, layers],
                                                   truth[column][:, layers], b)
        return acc, waste
    accs, wastes = [np.zeros(pred.shape[1])], [np.zeros(pred.shape[1])]
    if len(pred):
        accs, wastes = [], []
    for s in range(0, len(pred), b):
        rp, rt = pred[s:s + b].any(0), truth[s:s + b].any(0)            # (L, E)
        inter = (rp & rt).sum(-1)
        accs.append(inter / np.maximum(rt.sum(-1), 1))
        wastes.append((rp & ~rt).sum(-1) / np.maximum(rp.sum(-1), 1))
    return np.mean(accs, 0), np.mean(wastes, 0)


def frequency_prior(routes, mask, layer_mask=None) -> np.ndarray:
    """(L, E) fraction of counted positions that used each expert; with `layer_mask` (N, L)
    bool, per layer among the counted positions that ran it."""
    keep = np.asarray(mask, bool)
    r = np.asarray(routes, bool)[keep]
    if layer_mask is not None:
        lm = np.asarray(layer_mask, bool)[keep]
        return (r & lm[..., None]).sum(0) / np.maximum(lm.sum(0), 1)[:, None]
    return r.mean(0) if len(r) else np.zeros(r.shape[1:])


def baselines(ex, prior: np.ndarray, pregate=None) -> dict:
    """Score arrays (R, P + G, L, E) for the baselines over Examples `ex` (see the docstring).
    pregate: optional (R, P + G, L, E) multi-hot of pre-gate predictions."""
    routes = ex.routes.astype(np.float64)
    base = np.broadcast_to(prior, routes.shape).copy()
    tlp = base.copy()
    lm = ex.layer_mask                                      # (R, P + G, L)
    prev_ok = (ex.route_mask[:, :-1] > 0)[..., None] & lm[:, :-1] & lm[:, 1:]
    tlp[:, 1:] = np.where(prev_ok[..., None], routes[:, :-1], base[:, 1:])
    has_source = ~ex.first_in_stack[1:, None]               # (L - 1, 1): layer l - 1, same stack
    slp = base.copy()
    slp[:, :, 1:] = np.where(has_source, routes[:, :, :-1], base[:, :, 1:])
    out = {"prior": base, "tlp": tlp, "slp": slp}
    if pregate is not None:
        pg = base.copy()
        pg[:, :, 1:] = np.where(has_source, np.asarray(pregate, np.float64)[:, :, 1:],
                                base[:, :, 1:])
        out["pregate"] = pg
    return out


def pregate_routes(trace, ex) -> np.ndarray | None:
    """(R, P + G, L, E) multi-hot of the trace's pre-gate predictions, aligned with `ex`."""
    if trace.pregate is None:
        return None
    import dataclasses
    swapped = dataclasses.replace(trace, experts=trace.pregate)       # -1 entries: none
    got = examples(swapped, ex.routes.shape[1] - ex.tokens.shape[1])
    out = got.routes.copy()
    out[:, :, ex.first_in_stack] = False      # a stack's first MoE layer has no pre-gate
    return out
