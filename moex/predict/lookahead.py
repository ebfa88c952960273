"""Lookahead heads: small per-layer heads that map MoE layer l's hidden state to the expert sets
of the MoE layers ahead of it -- the runtime signal of the combined `predictive` policy.

Shape letters: N tokens, L MoE layers, D the target model's width, H the head's hidden width,
O offsets, E experts.

    cfg = LookaheadConfig.for_trace(trace, offsets=(1, 2, 3), hidden=256)
    params, log = train_heads(trace, cfg, HeadTrainConfig(), ckpt_dir=...)
    save_heads(out, cfg, params); cfg, params = load_heads(out)
    probs = head_probabilities(cfg, params, trace.hidden)     # (N, L, O, E)

A head reads one MoE layer's hidden state: by default (`source = "post-attention"`) the residual
stream after the layer's attention, before its FFN norm -- what its own router reads (through the
norm), available before the layer's experts run; or (`"pre-attention"`) the layer's input,
available before its attention. Head l at offset o predicts the experts of MoE layer l + o
(o = 1 .. d for post-attention; the pre-attention variant may also take o = 0, its own layer).
Each head is RMS-normalised input * a learned scale -> Dense(H) -> gelu -> Dense(O * E), or
linear (H = 0): `LookaheadConfig.head_params` counts its size.

Training reads the hidden states recorded with the traces (`moex lm trace --hidden`, trace
format v3: `hidden`, `hidden_pre`): multi-label BCE over (offset, expert) for every offset whose
layer exists, AdamW with warmup + cosine decay, batches of trace rows drawn from (seed, step),
orbax checkpoints with exact resume (`moex.training.fit`), a 90/10 split by request with the
validation loss logged. A head set is refused, with the shapes named, by a model or trace of
another shape (`check_model`, `check_trace`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moex.checkpoint import load_small, save_small
from moex.offload.forecast import batch_probability
from moex.offload.spec import HEADS_FILE
from moex.offload.store import moe_layers
from moex.offload.trace import Trace
from moex.predict.data import split_requests
from moex.training import TrainState, fit, make_step, warmup_cosine

SOURCES = {"post-attention": "hidden", "pre-attention": "hidden_pre"}   # -> trace field


@dataclasses.dataclass(frozen=True)
class LookaheadConfig:
    num_layers: int                     # L: MoE layers of the target model
    num_experts: int                    # E
    top_k: int
    width: int                          # D: the target model's hidden width
    offsets: tuple[int, ...] = (1, 2, 3)    # head l predicts MoE layers l + o
    hidden: int = 256                   # H (0: linear heads)
    source: str = "post-attention"      # or "pre-attention"
    model: str = ""                     # the target model's name

    def __post_init__(self):
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        if self.source not in SOURCES:
            raise ValueError(f"lookahead source {self.source!r}: expected one of {list(SOURCES)}")
        low = 0 if self.source == "pre-attention" else 1
        if not self.offsets or min(self.offsets) < low or len(set(self.offsets)) != len(self.offsets):
            raise ValueError(f"lookahead offsets {self.offsets}: expected distinct offsets >= "
                             f"{low} for a {self.source} head")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LookaheadConfig":
        return cls(**json.loads(text))

    @classmethod
    def for_trace(cls, trace: Trace, **kw) -> "LookaheadConfig":
        field = SOURCES[kw.get("source", "post-attention")]
        states = getattr(trace, field)
        if states is None:
            raise ValueError(f"trace of {trace.model} has no `{field}` hidden states: record it "
                             "with `moex lm trace --hidden` (or `moex vlm trace --hidden`)")
        return cls(len(trace.moe_layers), trace.num_experts, trace.top_k, states.shape[-1],
                   model=trace.model, **kw)

    @property
    def depth(self) -> int:
        return max(self.offsets)

    @property
    def head_params(self) -> int:
        """Parameters of one layer's head."""
        d, h, o = self.width, self.hidden, len(self.offsets) * self.num_experts
        return d + (d * h + h + h * o + o if h else d * o + o)

    def valid(self) -> np.ndarray:
        """(L, O) bool: head l's offset o names an existing MoE layer."""
        targets = np.arange(self.num_layers)[:, None] + np.asarray(self.offsets)[None]
        return targets < self.num_layers

    def _shape(self) -> tuple:
        return self.num_layers, self.num_experts, self.width

    def check_model(self, cfg) -> None:
        """Raise unless the target model has this head set's (L, E, D)."""
        got = (len(moe_layers(cfg)), cfg.decoder.moe.num_experts, cfg.decoder.d_model)
        if got != self._shape():
            raise ValueError(f"lookahead heads for (MoE layers, experts, width) = {self._shape()} "
                             f"(trained on {self.model or 'unknown'}) do not match {cfg.name}: "
                             f"it has {got}")

    def check_trace(self, trace: Trace, where: str = "trace") -> None:
        states = getattr(trace, SOURCES[self.source])
        width = None if states is None else states.shape[-1]
        got = (len(trace.moe_layers), trace.num_experts, width)
        if got != self._shape():
            raise ValueError(f"{where} of {trace.model} has (MoE layers, experts, "
                             f"{SOURCES[self.source]} width) = {got}; the lookahead heads "
                             f"(trained on {self.model or 'unknown'}) need {self._shape()}")


class LookaheadHeads(nn.Module):
    """One head per MoE layer, parameters stacked over L (see the module docstring)."""

    cfg: LookaheadConfig

    def setup(self):
        c = self.cfg
        n_out = len(c.offsets) * c.num_experts
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        self.scale = self.param("scale", nn.initializers.ones, (c.num_layers, c.width))
        if c.hidden:
            self.w_in = self.param("w_in", init, (c.num_layers, c.width, c.hidden))
            self.b_in = self.param("b_in", nn.initializers.zeros, (c.num_layers, c.hidden))
            self.w_out = self.param("w_out", init, (c.num_layers, c.hidden, n_out))
        else:
            self.w_out = self.param("w_out", init, (c.num_layers, c.width, n_out))
        self.b_out = self.param("b_out", nn.initializers.zeros, (c.num_layers, n_out))

    def _logits(self, x, take):
        """x (..., D) of one layer (take = its index) or (..., L, D) of all (take = slice)."""
        c = self.cfg
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.scale[take]
        if c.hidden:
            x = nn.gelu(jnp.einsum("...d,...dh->...h", x, self.w_in[take]) + self.b_in[take])
        out = jnp.einsum("...d,...do->...o", x, self.w_out[take]) + self.b_out[take]
        return out.reshape(*out.shape[:-1], len(c.offsets), c.num_experts)

    def __call__(self, hidden):
        """hidden (N, L, D) -> logits (N, L, O, E)."""
        return self._logits(hidden, slice(None))

    def layer(self, x, index):
        """x (B, T, D) at MoE layer `index` (a traced int) -> logits (B, T, O, E)."""
        return self._logits(x, index)


def init_heads(cfg: LookaheadConfig, seed: int = 0):
    x = jnp.zeros((1, cfg.num_layers, cfg.width), jnp.float32)
    return jax.jit(LookaheadHeads(cfg).init)(jax.random.key(seed), x)["params"]


def targets(trace: Trace, cfg: LookaheadConfig) -> np.ndarray:
    """(N, L, O, E) bool: the experts MoE layer l + o picked for each row (False past the end)."""
    routes = np.zeros((len(trace), cfg.num_layers, cfg.num_experts), bool)
    n, l, _ = np.indices(trace.experts.shape)
    routes[n, l, trace.experts.astype(np.int64)] = True
    out = np.zeros((len(trace), cfg.num_layers, len(cfg.offsets), cfg.num_experts), bool)
    for j, o in enumerate(cfg.offsets):
        out[:, :max(0, cfg.num_layers - o), j] = routes[:, o:]
    return out


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
    steps: int = 1500
    batch_size: int = 256               # trace rows per step
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def head_loss(cfg: LookaheadConfig):
    model = LookaheadHeads(cfg)
    valid = jnp.asarray(cfg.valid(), jnp.float32)                        # (L, O)

    def run(params, batch):
        logits = model.apply({"params": params}, batch["hidden"])
        per = optax.sigmoid_binary_cross_entropy(logits, batch["targets"].astype(jnp.float32))
        per = per.mean(-1) * valid                                       # (N, L, O)
        return per.sum() / jnp.maximum(valid.sum() * per.shape[0], 1.0), {}
    return run


def split_rows(trace: Trace, heldout: float = 0.1, seed: int = 0):
    """(train rows, validation rows): the RPP's seeded split of the requests (`split_requests`)."""
    ids = np.unique(trace.request)
    val = np.isin(trace.request, ids[split_requests(len(ids), heldout, seed)[1]])
    return np.flatnonzero(~val), np.flatnonzero(val)


def train_heads(trace: Trace, cfg: LookaheadConfig, train_cfg: HeadTrainConfig = HeadTrainConfig(),
                ckpt_dir=None, progress: bool = True, stop_at: int | None = None,
                rows=None, val_rows=None):
    """Train on the rows `rows` of `trace` (default all); returns (params, log)."""
    cfg.check_trace(trace)
    states = getattr(trace, SOURCES[cfg.source])
    rows = np.arange(len(trace)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise ValueError(f"no trace rows to train the lookahead heads on ({trace.model})")
    goal = targets(trace, cfg)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(warmup_cosine(train_cfg.lr, train_cfg.warmup, train_cfg.steps),
                                 weight_decay=train_cfg.weight_decay))
    state = TrainState.create(init_heads(cfg, train_cfg.seed), tx)

    def draw(step: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence([train_cfg.seed, step]))
        i = rows[rng.integers(0, len(rows), train_cfg.batch_size)]
        return {"hidden": jnp.asarray(states[i]), "targets": jnp.asarray(goal[i])}

    evaluate, every = None, 0
    if val_rows is not None and len(val_rows):
        loss = jax.jit(head_loss(cfg))
        batch = {"hidden": jnp.asarray(states[val_rows]), "targets": jnp.asarray(goal[val_rows])}
        evaluate = lambda st: {"val_loss": float(loss(st.params, batch)[0])}
        every = max(1, train_cfg.steps // 5)
    state, log = fit(state, make_step(head_loss(cfg), tx), draw, train_cfg.steps,
                     ckpt_dir=ckpt_dir, ckpt_every=max(1, train_cfg.steps // 5),
                     desc="lookahead heads", progress=progress, stop_at=stop_at,
                     evaluate=evaluate, eval_every=every)
    return state.params, log


@functools.lru_cache(maxsize=8)
def _all_layers(cfg: LookaheadConfig):
    model = LookaheadHeads(cfg)
    return jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x)))


@functools.lru_cache(maxsize=8)
def layer_fn(cfg: LookaheadConfig):
    """(params, x (B, T, D), MoE layer index) -> probabilities (B, T, O, E): one layer's heads,
    reading x at float16, the precision the trace records (so live and replayed hints agree).
    One function per config, so the engine compiles it into its attention piece once."""
    model = LookaheadHeads(cfg)

    def run(params, x, index):
        logits = model.apply({"params": params}, x.astype(jnp.float16), index,
                             method=LookaheadHeads.layer)
        return jax.nn.sigmoid(logits)
    return run


@functools.lru_cache(maxsize=8)
def _one_layer(cfg: LookaheadConfig):
    return jax.jit(layer_fn(cfg))


def head_probabilities(cfg: LookaheadConfig, params, hidden, batch: int = 4096) -> np.ndarray:
    """Probabilities (N, L, O, E) float32 from hidden states (N, L, D)."""
    run = _all_layers(cfg)
    return np.concatenate([np.asarray(run(params, jnp.asarray(hidden[s:s + batch])))
                           for s in range(0, len(hidden), batch)]) if len(hidden) else \
        np.zeros((0, cfg.num_layers, len(cfg.offsets), cfg.num_experts), np.float32)


def layer_scores(cfg: LookaheadConfig, probs: np.ndarray, offset: int, fill: np.ndarray):
    """Per-row scores (N, L, E) for every MoE layer from the heads' `offset`: layer m gets head
    m - offset's prediction; layers below `offset` get `fill` (L, E) (they have no head).
    Returns (scores, defined (L,) bool)."""
    j = cfg.offsets.index(offset)
    scores = np.broadcast_to(fill, (len(probs), *fill.shape)).astype(np.float64).copy()
    scores[:, offset:] = probs[:, :max(0, cfg.num_layers - offset), j]
    defined = np.arange(cfg.num_layers) >= offset
    return scores, defined


def save_heads(out, cfg: LookaheadConfig, params, metadata: dict | None = None) -> pathlib.Path:
    """OUT/lookahead.json + OUT/meta.json + OUT/params (orbax), written atomically."""
    return save_small(out, {HEADS_FILE: cfg.to_json(),
                            "meta.json": json.dumps(metadata or {}, indent=1, default=str)}, params)


def load_heads(path) -> tuple[LookaheadConfig, dict]:
    return load_small(path, HEADS_FILE, "lookahead head set",
                      "train one with `moex predictor train --kind lookahead`",
                      LookaheadConfig.from_json, init_heads)


@dataclasses.dataclass(frozen=True)
class HeadShape:
    """What `train_heads_from_trace` builds (the rest of LookaheadConfig comes from the trace)."""

    offsets: tuple[int, ...] = (1, 2, 3)    # head l predicts MoE layers l + o
    hidden: int = 256                       # a head's hidden width (0: linear)
    source: str = "post-attention"          # or "pre-attention"


def train_heads_from_trace(trace_path, out, shape: HeadShape = HeadShape(),
                           train_cfg: HeadTrainConfig = HeadTrainConfig(),
                           progress: bool = True) -> list[dict]:
    """Train a head set on one trace file (90/10 request split, validation loss logged), save it
    to OUT (resuming from OUT.train); returns the log."""
    trace = Trace.load(trace_path)
    cfg = LookaheadConfig.for_trace(trace, offsets=shape.offsets, hidden=shape.hidden,
                                    source=shape.source)
    train, val = split_rows(trace, 0.1, train_cfg.seed)
    out = pathlib.Path(out)
    params, log = train_heads(trace, cfg, train_cfg, ckpt_dir=out.with_name(out.name + ".train"),
                              progress=progress, rows=train, val_rows=val)
    save_heads(out, cfg, params, {"trace": str(trace_path), "train": dataclasses.asdict(train_cfg),
                                  "log": log})
    return log


class LookaheadHints:
    """The heads at run time, for the lookahead and combined policies: per MoE layer visit, the
    probability that the forward's tokens use each expert of the layers ahead, {offset: (E,)}
    for the offsets whose layer exists. `layer_fn` (compiled into the engine's attention piece)
    and `for_layer` serve the live engine, `for_rows` the replay simulator (the trace's recorded
    hidden states)."""

    name = "lookahead"

    def __init__(self, cfg: LookaheadConfig, params):
        if cfg.source != "post-attention":
            raise ValueError("the policies run post-attention heads (they see what the layer's "
                             f"router sees); this head set is {cfg.source}")
        self.cfg, self.params = cfg, params
        self._rows_of, self._row_probs = None, None       # for_rows: the trace's probabilities

    @classmethod
    def load(cls, path) -> "LookaheadHints":
        return cls(*load_heads(path))

    def check_model(self, cfg) -> None:
        self.cfg.check_model(cfg)

    def _ahead(self, index: int, token_probs, token_mask) -> dict:
        """token_probs (..., O, E) of MoE layer `index`'s tokens -> {offset: (E,)}: the
        probability that any (valid) token uses the expert, per offset whose layer exists."""
        batch = batch_probability(token_probs, token_mask)                       # (O, E)
        return {o: batch[j] for j, o in enumerate(self.cfg.offsets)
                if index + o < self.cfg.num_layers}

    @property
    def layer_fn(self):
        """The heads as a pure function (`layer_fn`), for the engine to compile into its piece."""
        return layer_fn(self.cfg)

    def dispatch(self, index: int, x):
        """The heads of MoE layer `index` alone on x (B, T, D) (a device array): (B, T, O, E)."""
        return _one_layer(self.cfg)(self.params, x, jnp.int32(index))

    def for_layer(self, index: int, token_probs, token_mask) -> dict:
        """{offset: (E,)} from the heads' per-token probabilities (B, T, O, E) of MoE layer
        `index` (the engine's fused piece or `dispatch`; this reads them back to the host)."""
        return self._ahead(index, np.asarray(token_probs), token_mask)

    def for_rows(self, trace: Trace, rows) -> list[dict]:
        """Per MoE layer of the forward that ran `rows`: its {offset: (E,)}. The heads run once
        over the whole trace (kept for the next call on the same trace)."""
        if self._rows_of is not trace:
            self._rows_of = trace
            self._row_probs = head_probabilities(self.cfg, self.params, trace.hidden)
        probs = self._row_probs[rows]                                             # (n, L, O, E)
        return [self._ahead(li, probs[:, li], None) for li in range(self.cfg.num_layers)]
