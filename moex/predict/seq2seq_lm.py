"""Train an encoder-decoder preset (moex.nn.encdec, Switch layout) on the stdlib corpus as a
byte-level denoiser (T5 span corruption), so its routers route with meaning.

    moex lm train small-switch                      # -> runs/lm/small-switch/{train/, model/}

Shape letters: B batch, L window bytes, N masked bytes, M spans, S = L - N + M encoder tokens,
T = N + M + 1 target tokens, V vocabulary.

Corruption (`corrupt`): each window of L corpus bytes gets N = round(density * L) masked bytes in
M = round(N / mean_span) spans (at most one per sentinel id). Span and gap lengths are random
partitions (T5's `random_spans_noise_mask`, except that the window may also start or end with a
span). Each span becomes one sentinel in the encoder input; the target is every span's sentinel
followed by its bytes, then EOS; the decoder input is the start token + the target shifted right.
Sentinels are the ids above the byte tokenizer's specials (eos + 1 ... V - 1: 259..271 at V 272),
span m gets sentinel eos + 1 + m. N and M are the same for every window, so S and T are fixed and
nothing is padded.

Training mirrors moex.predict.lm: optax AdamW with warmup + cosine decay, batches half code /
half prose drawn from (seed, step) (windows, span layout and the router-jitter key alike, so
resumed runs are exact), orbax checkpoints every `ckpt_every` steps (a rerun resumes). Hard-MoE
blocks of both stacks train through the one-hot dispatch path with a capacity factor
(Switch-style drops; the log's `dropped` is the fraction of routed pairs over capacity) and with
router jitter; loss = masked target cross-entropy + each stack's load-balance and z losses at its
config's weights. The log starts with the initial params' held-out numbers (step 0) and ends
with the trained ones (also every `eval_every`), from the inference config: target
cross-entropy and teacher-forced exact-span accuracy per domain, the fraction of experts used and
the busiest expert's share per MoE block (`evaluator`). The model is saved as a moex checkpoint
with the preset's inference config (dropless).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moex.config import EncDecConfig, get_config
from moex.model import build, init_params
from moex.predict.corpus import DOMAINS, samples
from moex.seq2seq import Seq2SeqGenerator
from moex.training import TrainState, adamw, claim_run_dir, fit, make_step, publish_model


@dataclasses.dataclass(frozen=True)
class Seq2SeqTrainConfig:
    preset: str = "small-switch"
    steps: int = 800
    batch_size: int = 16                # half code, half prose
    seq_len: int = 96                   # L: corpus bytes per window, before corruption
    noise_density: float = 0.15         # fraction of each window's bytes masked
    mean_span: float = 3.0              # mean masked-span length (bytes)
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    train_capacity_factor: float = 1.25
    eval_windows: int = 32              # held-out windows per domain
    eval_every: int = 0
    ckpt_every: int = 100
    seed: int = 0
    corpus_limit: int | None = None     # first N stdlib files only (tests)
    out: str = "runs/lm"

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out) / self.preset


# --- span corruption: plain numpy, a pure function of its rng -------------------------------------

@dataclasses.dataclass(frozen=True)
class SpanLayout:
    """The fixed sizes of one corruption setting: L window bytes, N masked bytes in M spans,
    sentinel ids first_sentinel ... first_sentinel + M - 1."""

    length: int
    noise: int
    spans: int
    first_sentinel: int
    eos: int
    start: int

    @classmethod
    def of(cls, cfg: EncDecConfig, length: int, density: float, mean_span: float) -> "SpanLayout":
        sentinels = cfg.vocab_size - (cfg.eos_token_id + 1)
        if sentinels < 1:
            raise ValueError(f"{cfg.name}: span corruption needs sentinel ids above the eos id "
                             f"{cfg.eos_token_id}, but the vocabulary has {cfg.vocab_size} ids; "
                             f"use a preset with a byte tokenizer and spare ids (vocab 272)")
        noise = int(round(length * density))
        if not 1 <= noise < length:
            raise ValueError(f"noise_density {density} masks {noise} of {length} bytes; expected "
                             f"at least 1 and fewer than all: raise density or seq_len")
        spans = int(np.clip(round(noise / mean_span), 1, min(sentinels, noise)))
        if length - noise < spans - 1:
            raise ValueError(f"{spans} spans need {spans - 1} kept bytes between them; "
                             f"{length} bytes at noise_density {density} keep {length - noise}")
        return cls(length, noise, spans, cfg.eos_token_id + 1, cfg.eos_token_id,
                   cfg.decoder_start_token_id)

    @property
    def encoder_len(self) -> int:           # S
        return self.length - self.noise + self.spans

    @property
    def target_len(self) -> int:            # T
        return self.noise + self.spans + 1


def layout_of(cfg: EncDecConfig, run: Seq2SeqTrainConfig) -> SpanLayout:
    return SpanLayout.of(cfg, run.seq_len, run.noise_density, run.mean_span)


def partition(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """`total` split into `parts` positive integers, uniformly over compositions."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1 if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def noise_spans(rng: np.random.Generator, layout: SpanLayout) -> list[tuple[int, int]]:
    """(start, end) of each masked span of one window, in order: M spans of N bytes in all,
    separated by at least one kept byte; the window may start or end inside a span."""
    noise = partition(rng, layout.noise, layout.spans)
    # M + 1 gaps, the first and last possibly empty: a composition of kept + 2 into M + 1
    gaps = partition(rng, layout.length - layout.noise + 2, layout.spans + 1)
    gaps[0] -= 1
    gaps[-1] -= 1
    out, pos = [], 0
    for gap, n in zip(gaps[:-1], noise):
        pos += int(gap)
        out.append((pos, pos + int(n)))
        pos += int(n)
    return out


def corrupt_window(window: np.ndarray, spans: list[tuple[int, int]], layout: SpanLayout):
    """One window (L,) -> (encoder ids (S,), target ids (T,))."""
    enc, tgt, pos = [], [], 0
    for m, (a, b) in enumerate(spans):
        sentinel = layout.first_sentinel + m
        enc += [*window[pos:a], sentinel]
        tgt += [sentinel, *window[a:b]]
        pos = b
    enc += list(window[pos:])
    tgt.append(layout.eos)
    return np.asarray(enc, np.int32), np.asarray(tgt, np.int32)


def corrupt(windows: np.ndarray, layout: SpanLayout, rng: np.random.Generator) -> dict:
    """(B, L) byte windows -> {'enc' (B, S), 'dec' (B, T) decoder input, 'target' (B, T)}."""
    pairs = [corrupt_window(w, noise_spans(rng, layout), layout) for w in windows]
    enc = np.stack([p[0] for p in pairs])
    target = np.stack([p[1] for p in pairs])
    dec = np.concatenate([np.full((len(target), 1), layout.start, np.int32), target[:, :-1]], 1)
    return {"enc": enc, "dec": dec, "target": target}


def restore(enc: np.ndarray, spans_out: dict[int, list[int]], layout: SpanLayout) -> bytes:
    """The window from one encoder row (S,) and each sentinel's bytes {sentinel id: bytes}
    (a missing sentinel restores to nothing)."""
    out = []
    for t in enc.tolist():
        out += spans_out.get(t, []) if t >= layout.first_sentinel else [t]
    return bytes(b for b in out if b < 256)


def split_target(ids, layout: SpanLayout) -> dict[int, list[int]]:
    """A target or generated row (sentinel, bytes, sentinel, bytes, ..., EOS) -> {sentinel id:
    its bytes}; stops at EOS, pad or the decoder start; bytes before the first sentinel are
    dropped."""
    out: dict[int, list[int]] = {}
    current = None
    for t in np.asarray(ids).tolist():
        if 256 <= t < layout.first_sentinel:            # EOS, pad, decoder start
            break
        if t >= layout.first_sentinel:
            current = t
            out.setdefault(t, [])
        elif current is not None:
            out[current].append(t)
    return out


def batch_for(run: Seq2SeqTrainConfig, layout: SpanLayout):
    """step -> the training batch of that step (a pure function of (seed, step)): corrupted
    windows, half code and half prose, and the step's router-jitter key."""
    half = run.batch_size // 2

    def draw(step: int) -> dict:
        seeds = np.random.SeedSequence([run.seed, step]).generate_state(3)
        windows = np.concatenate([
            samples(d, "train", n, run.seq_len, seed=int(s), limit=run.corpus_limit)
            for d, n, s in zip(DOMAINS, (half, run.batch_size - half), seeds)])
        batch = corrupt(windows, layout, np.random.default_rng(int(seeds[2])))
        batch["rng"] = np.asarray(jax.random.key_data(jax.random.key(int(seeds[2]))))
        return jax.tree.map(jnp.asarray, batch)
    return draw


def heldout_batches(run: Seq2SeqTrainConfig, layout: SpanLayout) -> dict:
    """{domain: corrupted held-out windows}: the same for every call with the same run."""
    return {d: corrupt(samples(d, "heldout", run.eval_windows, run.seq_len, seed=run.seed + 7,
                               limit=run.corpus_limit),
                       layout, np.random.default_rng([run.seed, 7, i]))
            for i, d in enumerate(DOMAINS)}


# --- model side -----------------------------------------------------------------------------------

def train_model_config(cfg: EncDecConfig, capacity_factor: float | None) -> EncDecConfig:
    """Both stacks' hard-MoE blocks through the differentiable one-hot dispatch with a capacity
    factor per sequence (Switch-style drops; a fixed expert_capacity is cleared so the factor
    holds); every param shape unchanged. (moex.training.train_model_config for decoder LMs.)"""
    def train(moe):
        if moe.kind != "hard":
            return moe
        return dataclasses.replace(moe, compute="dense", capacity_factor=capacity_factor,
                                   expert_capacity=None)
    return cfg.replace(encoder_moe=train(cfg.encoder_moe), decoder_moe=train(cfg.decoder_moe))


def aux_loss(aux: dict, cfg: EncDecConfig):
    """Weighted load-balance + z losses of every MoE block, each at its stack's weights."""
    total = jnp.zeros((), jnp.float32)
    for stack, moe in (("encoder", cfg.encoder_moe), ("decoder", cfg.decoder_moe)):
        for a in aux[stack]:
            if a:
                total = total + moe.aux_loss_weight * a["load_balance"] \
                    + moe.z_loss_weight * a["z_loss"]
    return total


def target_ce(logits, target, pad_id: int):
    """Mean cross-entropy (nats) over the target tokens that are not padding; logits (B, T, V)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target)
    mask = (target != pad_id).astype(jnp.float32)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def dropped(aux: dict):
    """Fraction of (token, choice) pairs over capacity, over every MoE block of both stacks
    (a dropped pair has combine weight 0)."""
    weights = [a["weights"] for s in ("encoder", "decoder") for a in aux[s] if a]
    if not weights:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.stack([(w == 0).mean() for w in weights]))


def seq2seq_loss(model, cfg: EncDecConfig):
    """(params, batch) -> (target CE + aux losses, metrics); router jitter from batch['rng']."""
    def loss_fn(params, batch):
        enc = batch["enc"]
        logits, aux = model.apply({"params": params}, enc, jnp.ones_like(enc), batch["dec"],
                                  rngs={"jitter": batch["rng"]})
        ce = target_ce(logits, batch["target"], cfg.pad_token_id)
        extra = aux_loss(aux, cfg)
        return ce + extra, {"ce": ce, "aux": extra, "dropped": dropped(aux)}
    return loss_fn


def span_ids(target: np.ndarray, layout: SpanLayout) -> np.ndarray:
    """(B, T) -> the span each target position belongs to (its sentinel and bytes), -1 for EOS
    and padding."""
    span = np.cumsum(target >= layout.first_sentinel, axis=1) - 1
    return np.where((target < layout.eos) | (target >= layout.first_sentinel), span, -1)


def span_exact(correct: np.ndarray, target: np.ndarray, layout: SpanLayout) -> float:
    """Fraction of spans whose every position (sentinel and bytes) is correct; correct (B, T)."""
    span = span_ids(target, layout)
    hits = total = 0
    for row_ok, row_span in zip(correct, span):
        for m in range(layout.spans):
            at = row_span == m
            if at.any():
                total += 1
                hits += bool(row_ok[at].all())
    return hits / max(total, 1)


@functools.lru_cache(maxsize=4)
def _eval_forward(cfg: EncDecConfig):
    """The jitted held-out forward of a config (one compile per config and process):
    (params, enc, dec, target) -> (target CE, argmax ids (B, T), {<stack><block>: expert ids})."""
    model = build(cfg)

    @jax.jit
    def forward(params, enc, dec, target):
        logits, aux = model.apply({"params": params}, enc, jnp.ones_like(enc), dec)
        ids = {f"{s}{i}": a["expert_ids"] for s in ("encoder", "decoder")
               for i, a in enumerate(aux[s]) if a}
        return target_ce(logits, target, cfg.pad_token_id), jnp.argmax(logits, -1), ids
    return forward


def evaluator(cfg: EncDecConfig, run: Seq2SeqTrainConfig, layout: SpanLayout):
    """state -> {heldout_<domain>: target CE (nats), span_acc_<domain>: teacher-forced exact-span
    accuracy; for each MoE block <stack><block> on both domains' held-out tokens, experts_used_:
    the fraction of experts given a token, top_share_: the busiest expert's share of tokens},
    with the inference config (dropless, no jitter)."""
    forward = _eval_forward(cfg)
    batches = heldout_batches(run, layout)

    def evaluate(state) -> dict:
        out, counts = {}, {}
        for d, b in batches.items():
            ce, pred, ids = forward(state.params, b["enc"], b["dec"], b["target"])
            out[f"heldout_{d}"] = float(ce)
            out[f"span_acc_{d}"] = span_exact(np.asarray(pred) == b["target"], b["target"], layout)
            for k, v in ids.items():
                counts[k] = counts.get(k, 0) + np.bincount(np.asarray(v).ravel(),
                                                           minlength=cfg.encoder_moe.num_experts
                                                           if k.startswith("enc")
                                                           else cfg.decoder_moe.num_experts)
        layers = [f"{s}{i}" for s, i in cfg.moe_layers()]
        out.update({f"experts_used_{k}": float((counts[k] > 0).mean()) for k in layers})
        out.update({f"top_share_{k}": float(counts[k].max() / counts[k].sum()) for k in layers})
        return out
    return evaluate


def denoise(cfg: EncDecConfig, params, batch: dict, layout: SpanLayout,
            generator: Seq2SeqGenerator | None = None) -> tuple[list[dict[int, list[int]]], float]:
    """Greedy generation on corrupted rows -> (per row {sentinel: generated bytes}, the fraction
    of spans generated exactly)."""
    gen = generator or Seq2SeqGenerator(cfg)
    enc = np.asarray(batch["enc"])
    out = gen(params, enc, np.ones_like(enc), max_new_tokens=layout.target_len + 4)
    got = [split_target(row, layout) for row in out.tokens]
    want = [split_target(row, layout) for row in np.asarray(batch["target"])]
    hits = sum(g.get(s) == b for g, w in zip(got, want) for s, b in w.items())
    return got, hits / max(sum(len(w) for w in want), 1)


def show(ids, layout: SpanLayout) -> str:
    """Ids as text: bytes decoded (UTF-8, errors replaced), sentinel m as <m>, EOS as </s>."""
    out, run = [], []
    for t in np.asarray(ids).tolist():
        if t < 256:
            run.append(t)
            continue
        out.append(bytes(run).decode("utf-8", "replace"))
        run = []
        if t >= layout.first_sentinel:
            out.append(f"<{t - layout.first_sentinel}>")
        elif t == layout.eos:
            out.append("</s>")
            break
    return "".join(out) + bytes(run).decode("utf-8", "replace")


def examples(cfg: EncDecConfig, params, run: Seq2SeqTrainConfig, n: int = 2,
             generator: Seq2SeqGenerator | None = None) -> dict:
    """Greedy denoising of the first `n` held-out windows of each domain: {domain: {'span_acc':
    greedy exact-span accuracy over all held-out windows, 'rows': [{'input', 'target',
    'greedy'}]}}."""
    layout = layout_of(cfg, run)
    gen = generator or Seq2SeqGenerator(cfg)
    report = {}
    for d, b in heldout_batches(run, layout).items():
        got, acc = denoise(cfg, params, b, layout, gen)
        rows = []
        for enc, tgt, g in zip(b["enc"][:n], b["target"][:n], got[:n]):
            flat = [t for s in sorted(g) for t in [s, *g[s]]] + [layout.eos]
            rows.append({"input": show(enc, layout), "target": show(tgt, layout),
                         "greedy": show(flat, layout)})
        report[d] = {"span_acc": acc, "rows": rows}
    return report


@functools.lru_cache(maxsize=4)
def _init_fn(cfg: EncDecConfig):
    """seed -> init_params(cfg, seed), compiled once per config and process."""
    return jax.jit(lambda seed: init_params(cfg, seed))


@functools.lru_cache(maxsize=4)
def _train_step(tcfg: EncDecConfig, lr: float, warmup: int, steps: int, weight_decay: float):
    """(optimizer, jitted train step) of a training config: one compile per setting and
    process (a resumed run reuses it)."""
    optimizer = adamw(lr, warmup, steps, weight_decay)
    return optimizer, make_step(seq2seq_loss(build(tcfg), tcfg), optimizer)


def train_seq2seq(run: Seq2SeqTrainConfig, progress: bool = True, stop_at: int | None = None):
    """Train (resuming from run_dir/train), save run_dir/model; returns (params, log). The log
    starts with the initial params' held-out numbers (step 0)."""
    if run.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (one window per domain), found {run.batch_size}")
    cfg = get_config(run.preset)
    if not isinstance(cfg, EncDecConfig):
        raise ValueError(f"{run.preset} is a decoder LM; the denoising trainer takes "
                         f"encoder-decoder presets (moex.predict.lm trains decoder LMs)")
    layout = layout_of(cfg, run)
    claim_run_dir(run.run_dir, run)
    optimizer, step = _train_step(train_model_config(cfg, run.train_capacity_factor), run.lr,
                                  run.warmup, run.steps, run.weight_decay)
    # committed to the device as a restored checkpoint is, so a resumed run reuses the step's
    # compilation (jit keys on committedness)
    state = jax.device_put(TrainState.create(_init_fn(cfg)(run.seed), optimizer),
                           jax.devices()[0])
    evaluate = evaluator(cfg, run, layout)
    initial = {"step": 0, **evaluate(state)}      # before fit donates the state
    state, log = fit(state, step, batch_for(run, layout), run.steps,
                     ckpt_dir=run.run_dir / "train", ckpt_every=run.ckpt_every,
                     desc=f"denoise {run.preset}", progress=progress, evaluate=evaluate,
                     eval_every=run.eval_every, stop_at=stop_at)
    log = [initial] + log
    publish_model(run.run_dir, state, run.steps, cfg,
                  {"trained": "byte-level span-corruption denoiser on the stdlib corpus "
                              "(code + prose)",
                   "config": dataclasses.asdict(run)}, log)
    return state.params, log
