"""What a hard-MoE model's routing looks like on benchmark prompts: expert load per layer, and
routing signatures per question category (task-conditioned routing signatures, arXiv 2603.11114).

    usage = routing_usage(cfg, params, tokenizer, questions)     # counts per (block, category)
    load_rows(usage)          per MoE block: normalised entropy of the expert load, busiest share
    signature_rows(usage)     per MoE block: Jensen-Shannon divergence between the categories'
                              expert-usage distributions, against the same divergence between two
                              halves of one category (how stable a signature is)

Shape letters: Q questions, B batch, T tokens, K experts chosen per token, E experts, C categories.
A block's usage counts every (token, choice) pair of the prompt's real tokens (image placeholders
included; padding excluded); vision-tower blocks count every patch token of the image.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moex.data.batching import batches, encode_batch
from moex.model import build


def _blocks(cfg) -> list[tuple[str, int]]:
    """[(tower, index into that tower's aux list)] of every hard-MoE block."""
    out = [("decoder", i) for i in range(cfg.decoder.num_layers)
           if cfg.decoder.moe.kind == "hard" and cfg.decoder.moe.is_moe_layer(i)]
    if cfg.vision is not None and cfg.vision.moe.kind == "hard":
        used = cfg.vision.num_layers + cfg.vision.feature_layer + 1
        out += [("vision", i) for i in range(used) if cfg.vision.moe.is_moe_layer(i)]
    return out


def routing_usage(cfg, params, tokenizer, questions: Sequence, batch_size: int = 32,
                  style: str = "compact", mode: str = "crop", template: str = "{prompt}") -> dict:
    """Expert-usage counts of `questions`' prompts: {"blocks": [(tower, layer)], "categories":
    [names], "counts": (blocks, C, E) int, "halves": (blocks, C, 2, E) int (each category's
    even- / odd-numbered questions), "num_experts": E}."""
    blocks = _blocks(cfg)
    if not blocks:
        raise ValueError(f"{cfg.name} has no hard-MoE blocks whose routing could be counted")
    model = build(cfg)

    @jax.jit
    def ids_of(p, t, m, im):
        _, _, aux = model.apply({"params": p}, t, m, im)
        return [aux[tower][i]["expert_ids"] for tower, i in blocks]

    categories = sorted({q.category for q in questions})
    e = max(cfg.decoder.moe.num_experts if cfg.decoder.moe.kind == "hard" else 0,
            cfg.vision.moe.num_experts if cfg.vision is not None else 0)
    counts = np.zeros((len(blocks), len(categories), 2, e), np.int64)
    seen = np.zeros(len(categories), np.int64)        # questions of each category so far
    for group in batches(questions, batch_size):
        n = len(group)
        padded = list(group) + [group[-1]] * (batch_size - n)     # one compiled shape
        b = encode_batch(padded, tokenizer, cfg.vision, style, mode=mode, template=template,
                         bucket=32)
        got = [np.asarray(g) for g in ids_of(params, jnp.asarray(b.ids), jnp.asarray(b.mask),
                                             jnp.asarray(b.images))]   # (B, T|N, K) per block
        for r, q in enumerate(group):
            c = categories.index(q.category)
            half = seen[c] % 2
            seen[c] += 1
            for j, (tower, _) in enumerate(blocks):
                rows = got[j][r][b.mask[r] > 0] if tower == "decoder" else got[j][r]
                counts[j, c, half] += np.bincount(rows.reshape(-1), minlength=e)[:e]
    return {"blocks": blocks, "categories": categories, "counts": counts.sum(2),
            "halves": counts, "num_experts": e}


def _dist(counts) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1)


def entropy(p) -> float:
    p = np.asarray(p, np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in bits (0: identical, 1: disjoint supports)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = (p + q) / 2
    kl = lambda a: float(np.sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(
        m > 0, m, 1)), 0.0)))
    return (kl(p) + kl(q)) / 2


def load_rows(usage: dict) -> list[dict]:
    """Per block: the expert load over all questions, its entropy / log E (1 = uniform) and the
    busiest expert's share (1/E = uniform)."""
    rows = []
    for j, (tower, layer) in enumerate(usage["blocks"]):
        load = _dist(usage["counts"][j].sum(0))
        rows.append({"tower": tower, "layer": layer,
                     "entropy": entropy(load) / np.log(usage["num_experts"]),
                     "busiest_share": float(load.max()), "busiest_expert": int(load.argmax()),
                     "load": load.round(4).tolist()})
    return rows


def signature_rows(usage: dict) -> list[dict]:
    """Per block: each category's mean expert-usage distribution (its signature), the mean JS
    divergence between two categories' signatures, and within a category (its two halves)."""
    rows = []
    cats = usage["categories"]
    for j, (tower, layer) in enumerate(usage["blocks"]):
        sig = _dist(usage["counts"][j])
        between = [js_divergence(sig[a], sig[b]) for a, b in itertools.combinations(range(len(cats)), 2)]
        halves = _dist(usage["halves"][j])
        within = [js_divergence(halves[c, 0], halves[c, 1]) for c in range(len(cats))]
        rows.append({"tower": tower, "layer": layer,
                     "between_js": float(np.mean(between)) if between else 0.0,
                     "within_js": float(np.mean(within)),
                     "signatures": {c: sig[i].round(4).tolist() for i, c in enumerate(cats)}})
    return rows


def markdown(usage: dict) -> str:
    """The load table and the signature table (top expert per category), as markdown."""
    cats = usage["categories"]
    lines = ["| block | load entropy / log E | busiest expert share (expert) | JS between "
             "categories | JS within a category | " + " | ".join(f"{c}: top experts" for c in cats)
             + " |", "|" + "---|" * (5 + len(cats))]
    for ld, sg in zip(load_rows(usage), signature_rows(usage)):
        tops = []
        for c in cats:
            p = np.asarray(sg["signatures"][c])
            best = np.argsort(-p)[:2]
            tops.append(" ".join(f"e{i} {p[i]:.2f}" for i in best))
        lines.append(f"| {ld['tower']} {ld['layer']} | {ld['entropy']:.3f} "
                     f"| {ld['busiest_share']:.2f} (e{ld['busiest_expert']}) "
                     f"| {sg['between_js']:.4f} | {sg['within_js']:.4f} | " + " | ".join(tops)
                     + " |")
    return "\n".join(lines)
