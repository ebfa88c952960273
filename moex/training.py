"""Training loops shared by the language-model, predictor and VLM trainers: optax state, orbax
`CheckpointManager` with resume, a progress bar, a loss log.

    state = TrainState.create(params, optimizer)
    state, log = fit(state, step_fn, batch_for, steps=500, ckpt_dir="runs/x", desc="lm")

`batch_for(step)` must be a pure function of the step (draw from a seed folded with the step), so
a run resumed from step s sees exactly the batches the uninterrupted run saw: resumed runs
reproduce the uninterrupted run's parameters bit for bit (tested). Checkpoints hold the params,
the optimizer state and the step; `fit` restores the latest one in `ckpt_dir` and continues.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from moex import checkpoint
from moex.model import shard_params
from moex.nn import sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(params, optimizer.init(params), jax.numpy.zeros((), jax.numpy.int32))

    @classmethod
    def sharded(cls, cfg, params, optimizer: optax.GradientTransformation,
                plan: sharding.Plan | None) -> "TrainState":
        """The state on the plan's mesh: params by their logical names, each optimizer moment
        like its param, the step and other scalars replicated (plan None: `create`)."""
        if plan is None:
            return cls.create(params, optimizer)
        params = shard_params(cfg, params, plan)
        whole = NamedSharding(plan.mesh, PartitionSpec())
        shape = jax.eval_shape(optimizer.init, params)
        like = jax.tree.map(lambda x: x.sharding, params)
        opt = optax.tree_map_params(optimizer, lambda _, s: s, shape, like,
                                    transform_non_params=lambda _: whole)
        opt_state = jax.jit(optimizer.init, out_shardings=opt)(params)
        return cls(params, opt_state, jax.device_put(jax.numpy.zeros((), jax.numpy.int32), whole))

    def shardings(self):
        """Where every leaf lives (for the train step to keep it there)."""
        return jax.tree.map(lambda x: x.sharding, self)


RUN_FILE = "run.json"
FREE_FIELDS = ("out", "eval_every", "ckpt_every", "mesh")   # where output goes, how often to
                                                             # log, which devices run it


def claim_run_dir(run_dir, config) -> None:
    """Tie a run folder to one training config (a dataclass), so a cached model or checkpoint is
    never reused for a run asked to train differently.

    The first call records the config in run_dir/run.json (a folder from before run.json is
    checked against its model's metadata instead). A later call whose config differs in any
    field but FREE_FIELDS raises a ValueError naming the fields, the folder and both values.
    """
    run_dir = pathlib.Path(run_dir)
    wanted = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config))).items()
              if k not in FREE_FIELDS}
    record, meta = run_dir / RUN_FILE, run_dir / "model" / "moex.json"
    source = record if record.exists() else meta
    found = json.loads(source.read_text()) if source.exists() else {}
    found = found.get("config") if source == meta else found
    if not found:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(wanted, indent=1))
        tmp.replace(record)
        return
    differ = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if differ:
        fields = ", ".join(f"{k}={new!r} (folder: {old!r})" for k, (old, new) in differ.items())
        raise ValueError(f"{run_dir} holds a run trained with another config ({source}): "
                         f"{fields}. Choose another output folder, or delete this one to "
                         f"retrain.")


def trained_model_dir(run_dir, config, train) -> pathlib.Path:
    """run_dir/model as trained with `config`: the folder is claimed for it (`claim_run_dir`),
    and `train()` runs only when no model is there yet (the cache)."""
    claim_run_dir(run_dir, config)
    model_dir = pathlib.Path(run_dir) / "model"
    if not model_dir.exists():
        train()
    return model_dir


def publish_model(run_dir, state: "TrainState", steps: int, cfg, metadata: dict, log: list,
                  copy_from=None) -> bool:
    """Once a run has reached `steps`, save its params as the moex checkpoint run_dir/model (with
    `metadata`, the log, and the tokenizer files found in `copy_from`) and the log as
    run_dir/log.json; True if it did so now."""
    run_dir = pathlib.Path(run_dir)
    if int(state.step) != steps or (run_dir / "model").exists():
        return False
    checkpoint.save(run_dir / "model", cfg, state.params, {**metadata, "log": log}, copy_from)
    (run_dir / "log.json").write_text(json.dumps(log, indent=1))
    return True


def train_model_config(cfg, capacity_factor: float | None):
    """The config a model trains with: every hard-MoE block (decoder, vision tower, projector)
    through the differentiable one-hot dispatch (the blocked CPU loop has no gradient), with a
    capacity factor (Switch-style token dropping; None: dropless); everything else, and every
    param shape, unchanged. Inference stays dropless."""
    def train(part):
        if part is None or part.moe.kind != "hard":
            return part
        return dataclasses.replace(part, moe=dataclasses.replace(
            part.moe, compute="dense", capacity_factor=capacity_factor))
    return cfg.replace(decoder=train(cfg.decoder), vision=train(cfg.vision),
                       projector=train(cfg.projector))


def warmup_cosine(lr: float, warmup: int, steps: int, final_fraction: float = 0.1):
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1),
                                              lr * final_fraction)


def adamw(lr: float, warmup: int, steps: int, weight_decay: float = 0.01,
          clip: float = 1.0) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(warmup_cosine(lr, warmup, steps), weight_decay=weight_decay))


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
              plan: sharding.Plan | None = None, state_shardings=None):
    """A jitted train step: (state, batch) -> (state, loss, metrics); loss_fn(params, batch) ->
    (loss, metrics dict). With a plan the step is traced under it (expert-parallel MoE blocks,
    activation shardings) and the new state keeps `state_shardings` (TrainState.shardings())."""

    def step(state: TrainState, batch):
        with sharding.use(plan):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params,
                                                                               batch)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, state.step + 1)
        if state_shardings is not None:
            new = jax.lax.with_sharding_constraint(new, state_shardings)
        return new, loss, metrics
    return jax.jit(step, donate_argnums=0)


class Checkpoints:
    """orbax CheckpointManager over TrainState; keeps the last `keep`."""

    def __init__(self, directory, keep: int = 2):
        import orbax.checkpoint as ocp
        self.dir = pathlib.Path(directory).absolute()
        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, extra: dict | None = None) -> None:
        step = int(state.step)
        self.manager.save(step, args=self.ocp.args.StandardSave(
            {"params": state.params, "opt_state": state.opt_state, "step": state.step}))
        self.manager.wait_until_finished()
        if extra is not None:
            (self.dir / f"log-{step}.json").write_text(json.dumps(extra))

    def restore(self, like: TrainState) -> TrainState:
        step = self.latest()
        # each leaf restored where `like` holds it: onto this run's mesh, whatever mesh (or
        # single device) wrote the checkpoint
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding),
                              {"params": like.params, "opt_state": like.opt_state,
                               "step": like.step})
        got = self.manager.restore(step, args=self.ocp.args.StandardRestore(target))
        return TrainState(got["params"], got["opt_state"], got["step"])

    def log(self) -> list:
        step = self.latest()
        path = self.dir / f"log-{step}.json"
        return json.loads(path.read_text()) if step is not None and path.exists() else []


def fit(state: TrainState, step_fn, batch_for: Callable[[int], Any], steps: int,
        ckpt_dir=None, ckpt_every: int = 100, log_every: int = 10, desc: str = "train",
        progress: bool = True, evaluate: Callable[[TrainState], dict] | None = None,
        eval_every: int = 0, stop_at: int | None = None, plan: sharding.Plan | None = None):
    """Train to `steps` (resuming from ckpt_dir's latest checkpoint); returns (state, log).

    log: [{"step", "loss", ...metrics}] every `log_every` steps, plus `evaluate(state)`'s dict
    every `eval_every` steps and at the end. `stop_at` ends early (as if interrupted) after that
    step, having checkpointed it. With a plan each batch is split over its batch axes.
    """
    from tqdm import tqdm
    ckpt = Checkpoints(ckpt_dir) if ckpt_dir is not None else None
    log: list = []
    if ckpt is not None and ckpt.latest() is not None:
        state = ckpt.restore(state)
        log = ckpt.log()
    start = int(state.step)
    end = min(steps, stop_at) if stop_at is not None else steps
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress)
    losses = []
    for i in range(start, end):
        state, loss, metrics = step_fn(state, sharding.put_batch(plan, batch_for(i)))
        losses.append(loss)
        done = i + 1
        if done % log_every == 0 or done == end:
            mean = float(np.mean([float(x) for x in losses]))
            losses = []
            entry = {"step": done, "loss": mean,
                     **{k: float(v) for k, v in metrics.items()}}
            if evaluate is not None and ((eval_every and done % eval_every == 0)
                                         or done == steps):
                entry.update(evaluate(state))
            log.append(entry)
            bar.set_postfix_str(f"loss {mean:.4f}")
        bar.update()
        if ckpt is not None and (done % ckpt_every == 0 or done == end):
            ckpt.save(state, log)
    bar.close()
    return state, log
