"""Train a preset's decoder as a byte-level language model on the stdlib corpus (code + prose), so
its routers route with meaning; then record routing traces per domain.

    moex lm train small-hard --steps 400            # -> runs/lm/small-hard/{train/, model/}
    moex lm trace runs/lm/small-hard/model --domain code --requests 64

Training: optax AdamW with warmup + cosine decay, batches half code / half prose drawn from
(seed, step) (so resumed runs are exact), orbax checkpoints every `ckpt_every` steps (a rerun
resumes), progress bar and loss log, held-out loss per domain at the end (and every
`eval_every`). Hard-MoE layers train through the one-hot dispatch path with a capacity factor
(`train_capacity_factor`, Switch-style token dropping; inference stays dropless); loss = next-byte
cross-entropy + the config's load-balance and z losses. The trained model is saved as a moex
checkpoint (`moex.checkpoint`) with the preset's inference config.

Traces: prompts are held-out (or train) windows of a domain; the all-resident offload engine
generates greedily and records every token's routing, its pre-gate prediction and its token id
(and, with `hidden`, every MoE layer's hidden states: what the lookahead heads train on).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tqdm import tqdm

from moex.config import EncDecConfig, VLMConfig, get_config
from moex.model import aux_loss, build, init_params
from moex.nn import sharding
from moex.offload.forecast import reference_run
from moex.offload.seq2seq_engine import seq2seq_reference_run
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace
from moex.predict.corpus import DOMAINS, samples
from moex.predict.seq2seq_lm import SpanLayout, corrupt
from moex.training import (TrainState, adamw, claim_run_dir, fit, make_step, publish_model,
                           train_model_config)


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    preset: str = "small-hard"
    steps: int = 400
    batch_size: int = 8                 # half code, half prose
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.01
    train_capacity_factor: float = 1.5
    eval_windows: int = 16
    eval_every: int = 0
    ckpt_every: int = 100
    seed: int = 0
    corpus_limit: int | None = None     # first N stdlib files only (tests)
    out: str = "runs/lm"
    mesh: str | None = None             # e.g. "data=2,expert=4" (moex.nn.sharding); None: 1 device

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out) / self.preset


def lm_loss(model, cfg: VLMConfig):
    def loss_fn(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = jnp.ones_like(inputs)
        logits, _, aux = model.apply({"params": params}, inputs, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        ce = ce.mean()
        extra = aux_loss(aux, cfg)
        return ce + extra, {"ce": ce, "aux": extra}
    return loss_fn


def batch_for(lm_run: LMTrainConfig):
    half = lm_run.batch_size // 2

    def draw(step: int) -> np.ndarray:
        parts = [samples(d, "train", n, lm_run.seq_len + 1, seed=int(np.random.SeedSequence([lm_run.seed, step, i]).generate_state(1)[0]),
                         limit=lm_run.corpus_limit)
                 for i, (d, n) in enumerate(zip(DOMAINS, (half, lm_run.batch_size - half)))]
        return np.concatenate(parts)
    return draw


def heldout_loss(model, cfg, lm_run: LMTrainConfig):
    """Mean next-byte cross-entropy (nats) on fixed held-out windows, per domain."""
    loss = jax.jit(lambda p, t: lm_loss(model, cfg)(p, t)[1]["ce"])
    windows = {d: samples(d, "heldout", lm_run.eval_windows, lm_run.seq_len + 1, seed=lm_run.seed + 7,
                          limit=lm_run.corpus_limit) for d in DOMAINS}

    def evaluate(state) -> dict:
        return {f"heldout_{d}": float(loss(state.params, jnp.asarray(w)))
                for d, w in windows.items()}
    return evaluate


def train_lm(lm_run: LMTrainConfig, progress: bool = True, stop_at: int | None = None):
    """Train (resuming from run_dir/train), save run_dir/model; returns (params, log)."""
    if lm_run.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (one window per domain), found {lm_run.batch_size}")
    cfg = get_config(lm_run.preset)
    plan = sharding.plan_for(lm_run.mesh)   # fails early
    claim_run_dir(lm_run.run_dir, lm_run)
    tcfg = train_model_config(cfg, lm_run.train_capacity_factor)
    model = build(tcfg)
    optimizer = adamw(lm_run.lr, lm_run.warmup, lm_run.steps, lm_run.weight_decay)
    state = TrainState.sharded(cfg, init_params(cfg, lm_run.seed), optimizer, plan)
    step = make_step(lm_loss(model, tcfg), optimizer, plan, plan and state.shardings())
    evaluate = heldout_loss(model, tcfg, lm_run)
    draw = batch_for(lm_run)
    state, log = fit(state, step, lambda i: jnp.asarray(draw(i)), lm_run.steps,
                     ckpt_dir=lm_run.run_dir / "train", ckpt_every=lm_run.ckpt_every,
                     desc=f"lm {lm_run.preset}", progress=progress, evaluate=evaluate,
                     eval_every=lm_run.eval_every, stop_at=stop_at, plan=plan)
    publish_model(lm_run.run_dir, state, lm_run.steps, cfg,
                  {"trained": "byte-level LM on the stdlib corpus (code + prose)",
                   "config": dataclasses.asdict(lm_run)}, log)
    return state.params, log


def record_traces(cfg: VLMConfig, params, domain: str, split: str, requests: int,
                  prompt_len: int, new_tokens: int, batch: int = 8, seed: int = 0,
                  corpus_limit: int | None = None, progress: bool = True,
                  hidden: bool = False):
    """Routing traces of `requests` greedy generations from `domain` prompts (one Trace); with
    `hidden` also every MoE layer's hidden states (trace format v3, for the lookahead heads).
    An encoder-decoder's prompts are its task's encoder inputs: the windows span-corrupted
    (`denoising_inputs`), its trace encoder rows then decoder steps (moex.offload.trace)."""
    if isinstance(cfg, EncDecConfig):
        if hidden:
            raise ValueError(f"{cfg.name}: hidden-state traces (lookahead heads) are recorded "
                             "on decoder models only")
        return _seq2seq_traces(cfg, params, domain, split, requests, prompt_len, new_tokens,
                               batch, seed, corpus_limit, progress)
    store = ExpertStore.from_params(cfg, params)
    windows = samples(domain, split, requests, prompt_len, seed, corpus_limit)
    traces = []
    for start in tqdm(range(0, requests, batch), desc=f"trace {domain}", disable=not progress):
        ids = windows[start:start + batch]
        traces.append(reference_run(cfg, store, ids, np.ones_like(ids), new_tokens=new_tokens,
                                    request_ids=np.arange(start, start + len(ids)),
                                    record_hidden=hidden).trace())
    trace = Trace.concat(traces)
    trace.domain = domain
    return trace


def denoising_inputs(cfg: EncDecConfig, domain: str, split: str, n: int, length: int,
                     seed: int = 0, corpus_limit: int | None = None):
    """(ids, mask) (n, S): `n` windows of `length` stdlib bytes span-corrupted as
    `moex lm train` trains an encoder-decoder (15 % of the bytes in spans of mean 3, each span a
    sentinel id), seeded by `seed`."""
    layout = SpanLayout.of(cfg, length, 0.15, 3.0)
    windows = samples(domain, split, n, length, seed, corpus_limit)
    enc = corrupt(windows, layout, np.random.default_rng(seed))["enc"]
    return enc, np.ones_like(enc)


def _seq2seq_traces(cfg: EncDecConfig, params, domain, split, requests, prompt_len, new_tokens,
                    batch, seed, corpus_limit, progress):
    store = ExpertStore.from_params(cfg, params)
    ids, mask = denoising_inputs(cfg, domain, split, requests, prompt_len, seed, corpus_limit)
    traces = []
    for start in tqdm(range(0, requests, batch), desc=f"trace {domain}", disable=not progress):
        rows = slice(start, start + batch)
        traces.append(seq2seq_reference_run(
            cfg, store, ids[rows], mask[rows], new_tokens=new_tokens,
            request_ids=np.arange(start, min(start + batch, requests))).trace())
    trace = Trace.concat(traces)
    trace.domain = domain
    return trace
