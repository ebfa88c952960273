"""Train, save, load and run the routing-path predictor; its forecaster for the `predictive`
offload policy.

    params, log = train_predictor(ex_train, rpp_cfg, PredictorTrainConfig(...), ckpt_dir=...)
    save_predictor(out, rpp_cfg, params); rpp_cfg, params = load_predictor(out)

Training: multi-label BCE (`bce_loss`) over real positions, AdamW with linear warmup + cosine
decay and separate learning rates for the head (`head_lr`) and the body (`body_lr`) as in
ExpertFlow (optax.multi_transform), batches drawn from (seed, step), orbax checkpoints with
resume (`moex.training.fit`), deterministic given the seed. On an encoder-decoder's examples
the loss counts only the layers each position ran (`Examples.layer_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moex.offload.trace import Trace
from moex.predict.data import examples
from moex.predict.model import RPPConfig, RoutingPathPredictor, bce_loss, init_predictor
from moex.training import TrainState, fit, make_step, warmup_cosine
from moex.checkpoint import load_small, save_small
from moex.offload.spec import PREDICTOR_FILE


@dataclasses.dataclass(frozen=True)
class PredictorTrainConfig:
    steps: int = 1500
    batch_size: int = 16
    head_lr: float = 3e-3
    body_lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def optimizer(train_cfg: PredictorTrainConfig) -> optax.GradientTransformation:
    def labels(params):
        return {k: jax.tree.map(lambda _: "head" if k == "head" else "body", v)
                for k, v in params.items()}
    tx = lambda lr: optax.adamw(warmup_cosine(lr, train_cfg.warmup, train_cfg.steps),
                                weight_decay=train_cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.multi_transform({"head": tx(train_cfg.head_lr), "body": tx(train_cfg.body_lr)},
                                             labels))


def loss_fn(rpp_cfg: RPPConfig):
    model = RoutingPathPredictor(rpp_cfg)

    def run(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["mask"],
                             batch.get("states"))
        loss = bce_loss(logits, batch["routes"], batch["route_mask"], batch.get("layer_mask"))
        return loss, {}
    return run


def _batch(ex, i) -> dict:
    out = {"tokens": jnp.asarray(ex.tokens[i]), "mask": jnp.asarray(ex.mask[i]),
           "routes": jnp.asarray(ex.routes[i]), "route_mask": jnp.asarray(ex.route_mask[i])}
    if ex.states is not None:
        out["states"] = jnp.asarray(ex.states[i])
    if ex.is_encdec:
        out["layer_mask"] = jnp.asarray(ex.layer_mask[i])
    return out


def batches(ex, train_cfg: PredictorTrainConfig):
    def draw(step: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence([train_cfg.seed, step]))
        i = rng.integers(0, len(ex), train_cfg.batch_size)
        return _batch(ex, i)
    return draw


def train_predictor(ex, rpp_cfg: RPPConfig, train_cfg: PredictorTrainConfig, ckpt_dir=None,
                    progress: bool = True, stop_at: int | None = None, evaluate=None):
    """Train on Examples `ex`; returns (params, log)."""
    if (ex.num_layers, ex.num_experts) != (rpp_cfg.num_layers, rpp_cfg.num_experts):
        raise ValueError(f"examples have (L, E) = ({ex.num_layers}, {ex.num_experts}), the "
                         f"predictor ({rpp_cfg.num_layers}, {rpp_cfg.num_experts})")
    enc = lambda x: None if x is None else int(np.sum(x))
    if enc(ex.in_encoder) != rpp_cfg.encoder_moe_layers:
        raise ValueError(f"examples have {enc(ex.in_encoder)} encoder MoE layers (None: a "
                         f"decoder LM), the predictor {rpp_cfg.encoder_moe_layers}")
    if (ex.states is None) != (rpp_cfg.state_width == 0):
        raise ValueError(f"the predictor reads states of width {rpp_cfg.state_width}; the "
                         f"examples {'lack' if ex.states is None else 'have'} them")
    if ex.tokens.shape[1] > rpp_cfg.max_prompt or ex.routes.shape[1] - ex.tokens.shape[1] != \
            rpp_cfg.gen_len:
        raise ValueError(f"examples have prompts of {ex.tokens.shape[1]} and "
                         f"{ex.routes.shape[1] - ex.tokens.shape[1]} generated positions; the "
                         f"predictor takes up to {rpp_cfg.max_prompt} and exactly {rpp_cfg.gen_len}")
    tx = optimizer(train_cfg)
    state = TrainState.create(init_predictor(rpp_cfg, train_cfg.seed), tx)
    state, log = fit(state, make_step(loss_fn(rpp_cfg), tx), batches(ex, train_cfg), train_cfg.steps,
                     ckpt_dir=ckpt_dir, ckpt_every=max(1, train_cfg.steps // 5), desc="predictor",
                     progress=progress, stop_at=stop_at, evaluate=evaluate,
                     eval_every=max(1, train_cfg.steps // 5) if evaluate else 0)
    return state.params, log


@functools.lru_cache(maxsize=8)
def _probabilities(rpp_cfg: RPPConfig):
    """The jitted predictor -> probabilities function of one config (compiled once per shape,
    shared by every call: a forecaster runs it at each request batch's admission)."""
    model = RoutingPathPredictor(rpp_cfg)
    return jax.jit(lambda p, t, m, s: jax.nn.sigmoid(model.apply({"params": p}, t, m, s)))


def predict(rpp_cfg: RPPConfig, params, tokens, mask, batch: int = 64,
            states=None) -> np.ndarray:
    """Probabilities (R, P + G, L, E) float32; states (R, P, W) for a predictor that reads
    them."""
    run = _probabilities(rpp_cfg)
    part = lambda a, s: None if a is None else jnp.asarray(a[s:s + batch])
    out = [np.asarray(run(params, jnp.asarray(tokens[s:s + batch]),
                          jnp.asarray(mask[s:s + batch]), part(states, s)))
           for s in range(0, len(tokens), batch)]
    return np.concatenate(out)


def save_predictor(out, rpp_cfg: RPPConfig, params, metadata: dict | None = None) -> pathlib.Path:
    """OUT/rpp.json + OUT/meta.json + OUT/params (orbax), written atomically."""
    return save_small(out, {PREDICTOR_FILE: rpp_cfg.to_json(),
                            "meta.json": json.dumps(metadata or {}, indent=1, default=str)}, params)


def load_predictor(path) -> tuple[RPPConfig, dict]:
    return load_small(path, PREDICTOR_FILE, "routing-path predictor",
                      "train one with `moex predictor train`", RPPConfig.from_json,
                      init_predictor)


@dataclasses.dataclass(frozen=True)
class PredictorShape:
    """The predictor's size for `train_from_trace` (the rest of RPPConfig comes from the trace)."""

    gen_len: int = 16                   # generated positions forecast per request
    d_model: int = 32
    d_ff: int = 2048
    max_prompt: int = 512               # at least the trace's longest prompt
    vocab_size: int = 260               # at least the trace's largest token id + 1
    states: bool = False                # also read the first MoE layer's input states (a VLM's
                                        # image tokens; the trace needs --hidden)


def train_from_trace(trace_path, out, shape: PredictorShape = PredictorShape(),
                     train_cfg: PredictorTrainConfig = PredictorTrainConfig()) -> list[dict]:
    """Train a routing-path predictor on one trace file (a 90/10 request split; the validation
    loss is logged), save it to OUT (resuming from OUT.train); returns the log."""
    trace = Trace.load(trace_path)
    ex = examples(trace, shape.gen_len, states=shape.states)
    train, val = ex.split(0.1, train_cfg.seed)
    rpp_cfg = RPPConfig(len(trace.moe_layers), trace.num_experts, trace.top_k,
                        vocab_size=int(max(trace.token.max() + 1, shape.vocab_size)),
                        d_model=shape.d_model, d_ff=shape.d_ff, gen_len=shape.gen_len,
                        max_prompt=max(shape.max_prompt, ex.tokens.shape[1]), model=trace.model,
                        state_width=0 if ex.states is None else ex.states.shape[-1],
                        encoder_moe_layers=None if ex.in_encoder is None
                        else int(ex.in_encoder.sum()))
    out = pathlib.Path(out)
    params, log = train_predictor(train, rpp_cfg, train_cfg, ckpt_dir=out.with_name(out.name + ".train"),
                                  evaluate=validation_loss(rpp_cfg, val))
    save_predictor(out, rpp_cfg, params, {"trace": str(trace_path), "train": dataclasses.asdict(train_cfg),
                                       "log": log})
    return log


def validation_loss(rpp_cfg: RPPConfig, val):
    loss = loss_fn(rpp_cfg)

    def evaluate(state) -> dict:
        return {"val_loss": float(loss(state.params, _batch(val, np.arange(len(val))))[0])}
    return evaluate
