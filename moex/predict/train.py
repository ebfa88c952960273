"""Train, save, load and run the routing-path predictor; its forecaster for the `predictive`
offload policy.

    params, log = train_predictor(ex_train, rcfg, PredictorTrainConfig(...), ckpt_dir=...)
    save_predictor(out, rcfg, params); rcfg, params = load_predictor(out)

Training: multi-label BCE (`bce_loss`) over real positions, AdamW with linear warmup + cosine
decay and separate learning rates for the head (`head_lr`) and the body (`body_lr`) as in
ExpertFlow (optax.multi_transform), batches drawn from (seed, step), orbax checkpoints with
resume (`moex.training.fit`), deterministic given the seed.

`PredictorForecast` serves the policy: at a request batch's prefill it runs the predictor once on
the prompts (before the first MoE layer) and keeps the per-position probabilities; a forward's
forecast is the probability that any of its tokens uses each expert
(`moex.offload.forecast.batch_probability`): the prompt positions at prefill, generated position
f - 1 at decode step f. Mispredictions are corrected at run time by the engine's demand loads.
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

from moex.predict.model import RPPConfig, RoutingPathPredictor, bce_loss, init_predictor
from moex.training import TrainState, fit, make_step, warmup_cosine


@dataclasses.dataclass(frozen=True)
class PredictorTrainConfig:
    steps: int = 1500
    batch_size: int = 16
    head_lr: float = 3e-3
    body_lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def optimizer(tc: PredictorTrainConfig) -> optax.GradientTransformation:
    def labels(params):
        return {k: jax.tree.map(lambda _: "head" if k == "head" else "body", v)
                for k, v in params.items()}
    tx = lambda lr: optax.adamw(warmup_cosine(lr, tc.warmup, tc.steps),
                                weight_decay=tc.weight_decay)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.multi_transform({"head": tx(tc.head_lr), "body": tx(tc.body_lr)},
                                             labels))


def loss_fn(rcfg: RPPConfig):
    model = RoutingPathPredictor(rcfg)

    def run(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["mask"])
        loss = bce_loss(logits, batch["routes"], batch["route_mask"])
        return loss, {}
    return run


def batches(ex, tc: PredictorTrainConfig):
    def draw(step: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence([tc.seed, step]))
        i = rng.integers(0, len(ex), tc.batch_size)
        return {"tokens": jnp.asarray(ex.tokens[i]), "mask": jnp.asarray(ex.mask[i]),
                "routes": jnp.asarray(ex.routes[i]),
                "route_mask": jnp.asarray(ex.route_mask[i])}
    return draw


def train_predictor(ex, rcfg: RPPConfig, tc: PredictorTrainConfig, ckpt_dir=None,
                    progress: bool = True, stop_at: int | None = None, evaluate=None):
    """Train on Examples `ex`; returns (params, log)."""
    if (ex.num_layers, ex.num_experts) != (rcfg.num_layers, rcfg.num_experts):
        raise ValueError(f"examples have (L, E) = ({ex.num_layers}, {ex.num_experts}), the "
                         f"predictor ({rcfg.num_layers}, {rcfg.num_experts})")
    if ex.tokens.shape[1] > rcfg.max_prompt or ex.routes.shape[1] - ex.tokens.shape[1] != \
            rcfg.gen_len:
        raise ValueError(f"examples have prompts of {ex.tokens.shape[1]} and "
                         f"{ex.routes.shape[1] - ex.tokens.shape[1]} generated positions; the "
                         f"predictor takes up to {rcfg.max_prompt} and exactly {rcfg.gen_len}")
    tx = optimizer(tc)
    state = TrainState.create(init_predictor(rcfg, tc.seed), tx)
    state, log = fit(state, make_step(loss_fn(rcfg), tx), batches(ex, tc), tc.steps,
                     ckpt_dir=ckpt_dir, ckpt_every=max(1, tc.steps // 5), desc="predictor",
                     progress=progress, stop_at=stop_at, evaluate=evaluate,
                     eval_every=max(1, tc.steps // 5) if evaluate else 0)
    return state.params, log


@functools.lru_cache(maxsize=8)
def _probabilities(rcfg: RPPConfig):
    """The jitted predictor -> probabilities function of one config (compiled once per shape,
    shared by every call: a forecaster runs it at each request batch's admission)."""
    model = RoutingPathPredictor(rcfg)
    return jax.jit(lambda p, t, m: jax.nn.sigmoid(model.apply({"params": p}, t, m)))


def predict(rcfg: RPPConfig, params, tokens, mask, batch: int = 64) -> np.ndarray:
    """Probabilities (R, P + G, L, E) float32."""
    run = _probabilities(rcfg)
    out = [np.asarray(run(params, jnp.asarray(tokens[s:s + batch]),
                          jnp.asarray(mask[s:s + batch])))
           for s in range(0, len(tokens), batch)]
    return np.concatenate(out)


def save_predictor(out, rcfg: RPPConfig, params, metadata: dict | None = None) -> pathlib.Path:
    """OUT/rpp.json + OUT/params (orbax), written to a temp dir and renamed into place."""
    import orbax.checkpoint as ocp
    from moex.checkpoint import staged
    with staged(out, replace=True) as tmp:
        (tmp / "rpp.json").write_text(rcfg.to_json())
        (tmp / "meta.json").write_text(json.dumps(metadata or {}, indent=1, default=str))
        ckpt = ocp.StandardCheckpointer()
        ckpt.save((tmp / "params").absolute(), params)
        ckpt.wait_until_finished()
    return pathlib.Path(out)


def load_predictor(path) -> tuple[RPPConfig, dict]:
    import orbax.checkpoint as ocp
    path = pathlib.Path(path)
    if not (path / "rpp.json").is_file():
        raise FileNotFoundError(f"{path}: not a routing-path predictor (no rpp.json)")
    rcfg = RPPConfig.from_json((path / "rpp.json").read_text())
    like = jax.eval_shape(lambda: init_predictor(rcfg))
    params = ocp.StandardCheckpointer().restore((path / "params").absolute(), like)
    return rcfg, params


class PredictorForecast:
    """Forecasts for the `predictive` policy from a routing-path predictor (see the docstring)."""

    name = "rpp"

    def __init__(self, rcfg: RPPConfig, params):
        self.rcfg, self.params = rcfg, params
        self.probs = None                                  # (B, P + G, L, E) of the batch
        self.mask, self.start = None, 0                    # its prompt mask, prefill's index

    def check_model(self, cfg) -> None:
        self.rcfg.check_model(cfg)

    def for_forward(self, index: int, tokens, token_mask, prefill: bool = True) -> np.ndarray:
        from moex.offload.forecast import batch_probability
        tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
        if prefill or self.probs is None:
            # a prefill (a new request batch): one predictor forward for all its positions
            self.probs = predict(self.rcfg, self.params, tokens, token_mask)
            self.mask, self.start = token_mask, index
            return batch_probability(self.probs[:, :tokens.shape[1]], token_mask)
        p = self.mask.shape[1]
        g = min(index - self.start - 1, self.rcfg.gen_len - 1)
        return batch_probability(self.probs[:, p + g][:, None], np.asarray(token_mask))
