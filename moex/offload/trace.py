"""Routing traces: which experts every token used in every MoE layer, for the routing-path
predictor and the replay simulator.

File format (`.npz`, written to a temp file and renamed):
  meta        JSON string: {"format": "moex-trace-v1", "model": name, "moe_layers": [decoder
              layer indices], "num_experts": E, "top_k": K}
  request     (N,) int32   request id of each traced token
  position    (N,) int32   the token's position in its request (0 = first prompt token)
  phase       (N,) int8    0 prompt (prefill), 1 generated (decode)
  experts     (N, L, K) int16   chosen experts per MoE layer, in router order
  probs       (N, L, E) float16 router probabilities per MoE layer
Rows are in the order the tokens were processed: a prefill's tokens, then decode steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile

import numpy as np

from moex.config import VLMConfig
from moex.offload.store import moe_layers

FORMAT = "moex-trace-v1"


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

    def __len__(self) -> int:
        return len(self.request)

    def check_model(self, cfg: VLMConfig, where: str = "trace") -> None:
        """Raise if this trace was not recorded on a model shaped like `cfg`."""
        want = (moe_layers(cfg), cfg.decoder.moe.num_experts, cfg.decoder.moe.top_k)
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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, meta=np.asarray(json.dumps(meta)), request=self.request,
                         position=self.position, phase=self.phase, experts=self.experts,
                         probs=self.probs)
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
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        n, layers, k = len(data["request"]), len(meta["moe_layers"]), meta["top_k"]
        shapes = {"experts": (n, layers, k), "probs": (n, layers, meta["num_experts"]),
                  "position": (n,), "phase": (n,)}
        for name, shape in shapes.items():
            if data[name].shape != shape:
                raise ValueError(f"{path}: {name} has shape {data[name].shape}, expected {shape}")
        return Trace(meta["model"], list(meta["moe_layers"]), meta["num_experts"], k,
                     data["request"], data["position"], data["phase"], data["experts"],
                     data["probs"])


class TraceRecorder:
    """Collects routing from forward passes (the `aux` a moex forward returns)."""

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.layers = moe_layers(cfg)
        if not self.layers:
            raise ValueError(f"{cfg.name} has no hard-MoE decoder layers to trace")
        self.rows: list[dict] = []

    def add(self, aux: dict, token_mask, request_ids, positions, phase: int) -> None:
        """aux: a forward's aux; token_mask, positions (B, T); request_ids (B,)."""
        mask = np.asarray(token_mask).astype(bool)
        b, t = mask.shape
        per_layer = [aux["decoder"][i] for i in self.layers]
        experts = np.stack([np.asarray(a["expert_ids"]) for a in per_layer], axis=2)  # B,T,L,K
        probs = np.stack([np.asarray(a["probs"]) for a in per_layer], axis=2)         # B,T,L,E
        req = np.broadcast_to(np.asarray(request_ids)[:, None], (b, t))
        self.rows.append({"request": req[mask], "position": np.asarray(positions)[mask],
                          "phase": np.full(mask.sum(), phase, np.int8),
                          "experts": experts[mask], "probs": probs[mask]})

    def trace(self) -> Trace:
        cat = lambda k, dtype: np.concatenate([r[k] for r in self.rows]).astype(dtype)
        m = self.cfg.decoder.moe
        return Trace(self.cfg.name, self.layers, m.num_experts, m.top_k, cat("request", np.int32),
                     cat("position", np.int32), cat("phase", np.int8), cat("experts", np.int16),
                     cat("probs", np.float16))
