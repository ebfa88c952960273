"""Routing traces: which experts every token used in every MoE layer, for the routing-path
predictor and the replay simulator.

File format (`.npz`, written to a temp file and renamed):
  meta        JSON string: {"format": "moex-trace-v3", "model": name, "moe_layers": [decoder
              layer indices], "num_experts": E, "top_k": K}; optional: "domain" (code, prose,
              vlm, ...) and "request_labels" (a label per request id 0..R-1, e.g. the question
              category of a VLM prompt)
  request     (N,) int32   request id of each traced token
  position    (N,) int32   the token's position in its request (0 = first prompt token)
  phase       (N,) int8    0 prompt (prefill), 1 generated (decode)
  forward     (N,) int32   index of the forward pass (prefill or decode step) that ran the token
  experts     (N, L, K) int16   chosen experts per MoE layer, in router order
  probs       (N, L, E) float16 router probabilities per MoE layer
  pregate     (N, L, K) int16   optional: row l holds the experts MoE layer l's router picks from
                                MoE layer l-1's hidden state (pre-gating; row 0 is -1)
  token       (N,) int32        optional: the token's id (input of the routing-path predictor)
  hidden      (N, L, D) float16 optional (v3): MoE layer l's hidden state before its own routing
                                -- the residual stream after the layer's attention, before the
                                FFN norm (input of the lookahead heads, `moex.predict.lookahead`)
  hidden_pre  (N, L, D) float16 optional (v3): MoE layer l's input before attention (the
                                "pre-attention" variant of the heads)
Rows are in the order the tokens were processed: a prefill's tokens, then decode steps.

Encoder-decoder models (moex.config.EncDecConfig; meta "encoder_layers": n_enc, the number of
encoder blocks): MoE layer ids are global, encoder block i -> i, decoder block j -> n_enc + j,
and `moe_layers` lists the encoder's MoE blocks first. An encoder token is a phase-0 row
(position = its encoder position, forward = the request batch's encoder pass); a decoder token
is a phase-1 row (position 0 = the decoder start token, then each fed token; forward = its
decode step). A row's experts are -1 (and its probs 0) in the layers its stack does not have:
`Trace.layer_mask()` gives (N, L) True where the row's token ran the layer.
v1 files (no `forward`, no `pregate`) load with one forward per row; v2 files are v3 files
without the hidden states.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile

import numpy as np

from moex.config import VLMConfig
from moex.offload.store import expert_moe, moe_layers

FORMAT = "moex-trace-v3"
READABLE = ("moex-trace-v1", "moex-trace-v2", FORMAT)
OPTIONAL = ("pregate", "token", "hidden", "hidden_pre")     # per-row arrays a trace may lack


@dataclasses.dataclass
class Trace:
    model: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    request: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    experts: np.ndarray
    probs: np.ndarray
    forward: np.ndarray | None = None
    pregate: np.ndarray | None = None
    token: np.ndarray | None = None
    domain: str | None = None
    request_labels: list[str] | None = None
    hidden: np.ndarray | None = None
    hidden_pre: np.ndarray | None = None
    encoder_layers: int | None = None    # encoder-decoder traces: the encoder's block count

    def __post_init__(self):
        if self.forward is None:
            self.forward = np.arange(len(self.request), dtype=np.int32)

    @property
    def is_encdec(self) -> bool:
        return self.encoder_layers is not None

    def layer_mask(self) -> np.ndarray:
        """(N, L) bool: the row's token ran MoE layer l (always, except in an encoder-decoder
        trace: encoder rows (phase 0) run the encoder's layers, decoder rows the decoder's)."""
        n, layers = len(self.request), np.asarray(self.moe_layers)
        if not self.is_encdec:
            return np.ones((n, len(layers)), bool)
        in_encoder = layers < self.encoder_layers
        return np.where((self.phase == 0)[:, None], in_encoder[None], ~in_encoder[None])

    def __len__(self) -> int:
        return len(self.request)

    def check_model(self, cfg: VLMConfig, where: str = "trace") -> None:
        """Raise if this trace was not recorded on a model shaped like `cfg`."""
        moe = expert_moe(cfg)
        want = (moe_layers(cfg), moe.num_experts, moe.top_k)
        got = (self.moe_layers, self.num_experts, self.top_k)
        if want != got:
            raise ValueError(f"{where} does not match {cfg.name}: expected MoE layers {want[0]}, "
                             f"{want[1]} experts, top-{want[2]}; the trace has MoE layers "
                             f"{got[0]}, {got[1]} experts, top-{got[2]} (recorded on "
                             f"{self.model})")

    def save(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model": self.model, "moe_layers": self.moe_layers,
                "num_experts": self.num_experts, "top_k": self.top_k}
        meta.update({k: getattr(self, k) for k in ("domain", "request_labels", "encoder_layers")
                     if getattr(self, k) is not None})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                extra = {k: getattr(self, k) for k in OPTIONAL if getattr(self, k) is not None}
                np.savez(f, meta=np.asarray(json.dumps(meta)), request=self.request,
                         position=self.position, phase=self.phase, forward=self.forward,
                         experts=self.experts, probs=self.probs, **extra)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def load(path) -> "Trace":
        path = pathlib.Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable trace file ({e})") from e
        missing = {"meta", "request", "position", "phase", "experts", "probs"} - set(data)
        if missing:
            raise ValueError(f"{path}: trace file lacks {sorted(missing)}")
        meta = json.loads(str(data["meta"]))
        if meta.get("format") not in READABLE:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected one of {READABLE}")
        n, layers, k = len(data["request"]), len(meta["moe_layers"]), meta["top_k"]
        width = next((data[h].shape[-1] for h in ("hidden", "hidden_pre") if h in data), 0)
        shapes = {"experts": (n, layers, k), "probs": (n, layers, meta["num_experts"]),
                  "position": (n,), "phase": (n,), "forward": (n,), "pregate": (n, layers, k),
                  "token": (n,), "hidden": (n, layers, width), "hidden_pre": (n, layers, width)}
        for name, shape in shapes.items():
            if name in data and data[name].shape != shape:
                raise ValueError(f"{path}: {name} has shape {data[name].shape}, expected {shape}")
        return Trace(meta["model"], list(meta["moe_layers"]), meta["num_experts"], k,
                     data["request"], data["position"], data["phase"], data["experts"],
                     data["probs"], data.get("forward"), data.get("pregate"), data.get("token"),
                     meta.get("domain"), meta.get("request_labels"), data.get("hidden"),
                     data.get("hidden_pre"), meta.get("encoder_layers"))

    @staticmethod
    def concat(traces: list["Trace"]) -> "Trace":
        """One trace of several, in order; forward ids are renumbered to stay distinct."""
        if not traces:
            raise ValueError("no traces to concatenate")
        first = traces[0]
        for t in traces[1:]:
            if (t.moe_layers, t.num_experts, t.top_k, t.encoder_layers) != (
                    first.moe_layers, first.num_experts, first.top_k, first.encoder_layers):
                raise ValueError(f"cannot concatenate traces of {first.model} and {t.model}: "
                                 "their MoE layers, experts or top-k differ")
        offsets = np.cumsum([0] + [int(t.forward.max()) + 1 for t in traces[:-1]])
        cat = lambda name: np.concatenate([getattr(t, name) for t in traces])
        optional = lambda name: cat(name) if all(getattr(t, name) is not None
                                                 for t in traces) else None
        return Trace(first.model, first.moe_layers, first.num_experts, first.top_k,
                     cat("request"), cat("position"), cat("phase"), cat("experts"),
                     cat("probs"), np.concatenate([t.forward + o for t, o in zip(traces, offsets)]),
                     optional("pregate"), optional("token"), hidden=optional("hidden"),
                     hidden_pre=optional("hidden_pre"), encoder_layers=first.encoder_layers)


class TraceRecorder:
    """Collects routing from forward passes (the `aux` a moex forward returns)."""

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.layers = moe_layers(cfg)
        if not self.layers:
            raise ValueError(f"{cfg.name} has no hard-MoE decoder layers to trace")
        self.rows: list[dict] = []

    def add(self, aux: dict, token_mask, request_ids, positions, phase: int,
            pregate=None, tokens=None, hidden=None, hidden_pre=None) -> None:
        """aux: a forward's aux (or any dict with aux["decoder"][layer] holding "expert_ids"
        (B, T, K) and "probs" (B, T, E); a layer it lacks did not run: -1 and 0); token_mask, positions (B, T); request_ids (B,);
        pregate: optional (B, T, L, K) pre-gate predictions (see the file format); tokens:
        optional (B, T) token ids; hidden, hidden_pre: optional (B, T, L, D) hidden states."""
        mask = np.asarray(token_mask).astype(bool)
        b, t = mask.shape
        moe = expert_moe(self.cfg)
        absent = {"expert_ids": np.full((b, t, moe.top_k), -1), "probs": np.zeros(
            (b, t, moe.num_experts), np.float32)}                # a layer this pass did not run
        dec = aux["decoder"]                # a forward's list per layer, or {layer: aux}
        per_layer = [dec.get(i, absent) if isinstance(dec, dict) else dec[i]
                     for i in self.layers]
        experts = np.stack([np.asarray(a["expert_ids"]) for a in per_layer], axis=2)  # B,T,L,K
        probs = np.stack([np.asarray(a["probs"]) for a in per_layer], axis=2)         # B,T,L,E
        req = np.broadcast_to(np.asarray(request_ids)[:, None], (b, t))
        row = {"request": req[mask], "position": np.asarray(positions)[mask],
               "phase": np.full(mask.sum(), phase, np.int8),
               "forward": np.full(mask.sum(), len(self.rows), np.int32),
               "experts": experts[mask], "probs": probs[mask]}
        if pregate is not None:
            row["pregate"] = np.asarray(pregate)[mask]
        if tokens is not None:
            row["token"] = np.asarray(tokens)[mask]
        for name, value in (("hidden", hidden), ("hidden_pre", hidden_pre)):
            if value is not None:
                row[name] = np.asarray(value)[mask]
        self.rows.append(row)

    def trace(self) -> Trace:
        if not self.rows:
            raise ValueError("no forward was recorded")
        cat = lambda k, dtype: np.concatenate([r[k] for r in self.rows]).astype(dtype)
        m = expert_moe(self.cfg)
        optional = lambda k, dtype: cat(k, dtype) if all(k in r for r in self.rows) else None
        return Trace(self.cfg.name, self.layers, m.num_experts, m.top_k, cat("request", np.int32),
                     cat("position", np.int32), cat("phase", np.int8), cat("experts", np.int16),
                     cat("probs", np.float16), cat("forward", np.int32),
                     optional("pregate", np.int16), optional("token", np.int32),
                     hidden=optional("hidden", np.float16),
                     hidden_pre=optional("hidden_pre", np.float16),
                     encoder_layers=getattr(self.cfg, "encoder_layers", None))
