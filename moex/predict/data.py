"""Routing traces -> predictor examples: per request its prompt tokens and the multi-hot routes of
every prompt token and of its first G generated tokens.

Shape letters: R requests, P prompt length (left-padded), G generated positions, L MoE layers,
E experts.

    ex = examples(trace, gen_len=32)
    ex.tokens (R, P) int32, ex.mask (R, P), ex.routes (R, P + G, L, E) bool,
    ex.route_mask (R, P + G) -- 1 where the position exists (real prompt token / generated token)
    ex.layer_mask (R, P + G, L) bool -- the position's token runs MoE layer l (all True for a
                                decoder LM; see below); losses and metrics count only these
    ex.rows (R, P + G) int64 -- the trace row of each position (-1 where none): per-row scores
                                (N, L, E) map onto the grid as scores[ex.rows]
    ex.states (R, P, W) float16 or None -- with `states=True`, the prompt's states entering the
                                first MoE layer (trace field `hidden_pre`, layer 0)

A generated position g holds the routing of the g-th token the request *fed* in decode (the
token sampled before it), in order. The trace must carry token ids (`moex.offload.engine`
records them).

Encoder-decoder traces (`Trace.is_encdec`, format in `moex.offload.trace`): the prompt is the
encoder input (the phase-0 rows, by position) and the generated positions are the decoder's
(phase-1 rows: position 0 the decoder start token, then each fed token). `ex.in_encoder` (L,)
marks the encoder's MoE layers (listed first); a prompt position runs only those and a
generated position only the others, so `layer_mask` is in_encoder on the prompt and its
negation on the generated positions. A trace's -1 entries (a layer the row did not run) never
become routes. `ex.in_encoder` is None for a decoder LM.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Examples:
    tokens: np.ndarray
    mask: np.ndarray
    routes: np.ndarray
    route_mask: np.ndarray
    requests: np.ndarray          # (R,) request ids
    rows: np.ndarray              # (R, P + G) trace row per position, -1 where none
    num_layers: int
    num_experts: int
    top_k: int
    states: np.ndarray | None = None  # (R, P, W) first MoE layer's input states of the prompt
    layer_mask: np.ndarray | None = None  # (R, P + G, L) bool; None: all True (filled in)
    in_encoder: np.ndarray | None = None  # (L,) bool encoder MoE layers; None: a decoder LM

    def __post_init__(self):
        if self.layer_mask is None:
            self.layer_mask = np.ones(self.routes.shape[:3], bool)

    @property
    def is_encdec(self) -> bool:
        return self.in_encoder is not None

    @property
    def first_in_stack(self) -> np.ndarray:
        """(L,) bool: MoE layers with no earlier MoE layer in their stack (layer 0; for an
        encoder-decoder also the decoder's first), where SLP and pre-gate have no source."""
        return first_in_stack(self.num_layers, self.in_encoder)

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index) -> "Examples":
        return dataclasses.replace(self, tokens=self.tokens[index], mask=self.mask[index],
                                   routes=self.routes[index], route_mask=self.route_mask[index],
                                   requests=self.requests[index], rows=self.rows[index],
                                   states=None if self.states is None else self.states[index],
                                   layer_mask=self.layer_mask[index])

    def split(self, heldout: float = 0.1, seed: int = 0) -> tuple["Examples", "Examples"]:
        """(train, validation) by a seeded permutation of the requests."""
        train, val = split_requests(len(self), heldout, seed)
        return self.take(train), self.take(val)


def first_in_stack(num_layers: int, in_encoder: np.ndarray | None) -> np.ndarray:
    """(L,) bool: MoE layer l has no earlier MoE layer in its stack (in_encoder (L,) bool for an
    encoder-decoder, None for a decoder LM)."""
    out = np.zeros(num_layers, bool)
    out[:1] = True
    if in_encoder is not None:
        out[1:] |= np.asarray(in_encoder[1:]) != np.asarray(in_encoder[:-1])
    return out


def encoder_layers(trace) -> np.ndarray | None:
    """(L,) bool: the trace's MoE layers that are the encoder's; None for a decoder LM."""
    if not trace.is_encdec:
        return None
    return np.asarray(trace.moe_layers) < trace.encoder_layers


def split_requests(n: int, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices (sorted) of n requests: a seeded permutation, the first
    round(heldout * n) (at least one when n > 1) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(heldout * n))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def examples(trace, gen_len: int, max_prompt: int | None = None,
             states: bool = False) -> Examples:
    if states and trace.hidden_pre is None:
        raise ValueError(f"trace of {trace.model} has no hidden states (`hidden_pre`): record it "
                         "with --hidden to train or run a predictor that reads them")
    if trace.token is None:
        raise ValueError(f"trace of {trace.model} has no token ids: record it with the offload "
                         "engine (moex.offload.engine.OffloadEngine.trace)")
    l, e = len(trace.moe_layers), trace.num_experts
    ids = np.unique(trace.request)
    prompts, gens = [], []
    for r in ids:
        rows = np.flatnonzero(trace.request == r)
        prompt = rows[trace.phase[rows] == 0]
        prompt = prompt[np.argsort(trace.position[prompt], kind="stable")]
        gen = rows[trace.phase[rows] == 1][:gen_len]
        prompts.append(prompt)
        gens.append(gen)
    p = max(len(x) for x in prompts)
    if max_prompt is not None and p > max_prompt:
        raise ValueError(f"a prompt of {p} tokens is longer than max_prompt {max_prompt}")
    n = len(ids)
    tokens = np.zeros((n, p), np.int32)
    mask = np.zeros((n, p), np.int32)
    routes = np.zeros((n, p + gen_len, l, e), bool)
    route_mask = np.zeros((n, p + gen_len), np.int32)
    rows = np.full((n, p + gen_len), -1, np.int64)
    for i, (prompt, gen) in enumerate(zip(prompts, gens)):
        off = p - len(prompt)                                   # left padding
        rows[i, off:p] = prompt
        rows[i, p:p + len(gen)] = gen
        tokens[i, off:] = trace.token[prompt]
        mask[i, off:] = 1
        for j, row in enumerate(prompt):
            _set(routes[i, off + j], trace.experts[row])
        route_mask[i, off:p] = 1
        for g, row in enumerate(gen):
            _set(routes[i, p + g], trace.experts[row])
        route_mask[i, p:p + len(gen)] = 1
    in_encoder = encoder_layers(trace)
    layer_mask = None
    if in_encoder is not None:
        layer_mask = np.empty((n, p + gen_len, l), bool)
        layer_mask[:, :p], layer_mask[:, p:] = in_encoder, ~in_encoder
    grid = None
    if states:
        grid = np.zeros((n, p, trace.hidden_pre.shape[-1]), np.float16)
        prompt_rows = rows[:, :p]
        grid[prompt_rows >= 0] = trace.hidden_pre[prompt_rows[prompt_rows >= 0], 0]
    return Examples(tokens, mask, routes, route_mask, ids, rows, l, e, trace.top_k, grid,
                    layer_mask, in_encoder)


def on_grid(ex: Examples, row_scores: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Per-row scores (N, L, E) -> (R, P + G, L, E) on the examples' grid (`fill` (L, E) where a
    position has no row)."""
    out = np.asarray(row_scores, np.float64)[np.maximum(ex.rows, 0)]
    out[ex.rows < 0] = fill
    return out


def _set(dst: np.ndarray, experts: np.ndarray) -> None:
    """dst (L, E) bool; experts (L, K) ids (-1: none, a layer the token did not run)."""
    for li, row in enumerate(experts):
        dst[li, row[row >= 0]] = True
