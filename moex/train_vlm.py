"""Train a VLM on multiple-choice questions (the synthetic MMBench by default), so that its
accuracy, and its routing, mean something.

    moex vlm train mini-dense                                    # -> runs/vlm/mini-dense/model
    moex vlm train mini-hard --init runs/vlm/mini-dense/model    # sparse upcycling, then fine-tune

Every step draws `batch_size` examples from (seed, step), so a resumed run is exact. On the
synthetic benchmark each example is a fresh question (`moex.data.synthetic.fresh_questions`: no
epochs, no memorised split; the dev split is another stream); with `train_file` (any
MMBench-format TSV) they are drawn from its questions. Each example is one of three rows:

  choice      the "compact" prompt (question + lettered options, rotated by a random k) ->
              the answer in `answer_format` + EOS; "text" (the option's text, e.g. " red") is
              read back by MMBench's matcher (`moex.eval.scorer.parse_letter`), and CircularEval
              still applies. Small models trained from scratch learn "image -> attribute word" long
              before "find the line that says it and copy its letter".
  likelihood  the question without options -> the answer's text + EOS (what SEED-Bench's
              likelihood ranking scores); a `likelihood_rate` share of the rows
  caption     "Describe the image." -> the scene description (`synthetic.caption`; LLaVA's
              stage-1 alignment task): every shape's colour, kind and place, ~15 supervised
              tokens per image instead of one; a `caption_rate` share (synthetic data only)

Loss: cross-entropy on the target tokens only, plus the config's load-balance and z losses.
Hard-MoE blocks train through the one-hot dispatch (`train_model_config`; dropless unless
`train_capacity_factor` is set). optax AdamW with warmup + cosine decay; orbax checkpoints with
resume (`moex.training.fit`); held-out accuracy on the dev split every `eval_every` steps and at
the end (the learning curve, in the log). The model is saved as a moex checkpoint with the preset's
inference config and its tokenizer.json (`moex.data.vocab.tokenizer_for` reads it back).

`init`: a dense moex checkpoint to start from instead of random weights; it is upcycled to the
preset's MoE layout (`moex.upcycle.upcycle_params`). A run folder (out/PRESET) belongs to the
config that first trained in it (`run.json`): `trained_model` loads its model as a cache, and a
config that differs in anything but where output goes or how often it logs is refused with the
differing fields named, never silently reused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moex import checkpoint
from moex.config import get_config
from moex.data.images import preprocess
from moex.data.mmbench import read_mmbench
from moex.data.prompts import build_prompt, continuation, likelihood_prompt, rotate
from moex.data.vocab import tokenizer_for, write_tokenizer
from moex.model import aux_loss, build, init_params
from moex.nn import sharding
from moex.tokenizer import left_pad
from moex.training import (TrainState, adamw, claim_run_dir, fit, make_step, publish_model,
                           train_model_config, trained_model_dir)
from moex.data.records import MAX_OPTIONS, Question
from moex.data.synthetic import (CAPTION_PROMPT, CATEGORIES, COLORS, COUNTS, HINTS, POSITIONS,
                                 SHAPES, Shape, SyntheticSpec, caption, fresh_questions,
                                 question_texts, write_synthetic)
from moex.eval.scorer import ScoreConfig, Scorer
from moex.upcycle import check_upcyclable, upcycle_params

KINDS = ("choice", "likelihood", "caption")
ANSWER_FORMATS = {"text": lambda q: continuation(q.options[q.answer]),
                  "letter": lambda q: q.answer_letter,
                  "text-letter": lambda q: f" {q.options[q.answer]} ({q.answer_letter})"}


@dataclasses.dataclass(frozen=True)
class VLMTrainConfig:
    preset: str = "mini-dense"
    data: str = "runs/data/synthetic"   # synthetic data root (dev split written there if missing)
    train_file: str | None = None       # an MMBench-format TSV to train on instead
    dev_file: str | None = None         # MMBench-format TSV for held-out accuracy
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    answer_format: str = "text"         # ANSWER_FORMATS
    likelihood_rate: float = 0.15       # share of rows with the likelihood target
    caption_rate: float = 0.6           # share of caption rows (synthetic training only); 0.6
                                        # beat 0.3 / 0.8 / a 1.0 -> 0.3 schedule (ARCHITECTURE.md)
    category_weights: tuple[float, ...] | None = None   # fresh questions per category
                                        # (color, shape, count, position); None: equal turns
    train_capacity_factor: float | None = None   # hard MoE in training; None = dropless
    init: str | None = None             # dense moex checkpoint to upcycle from (None: random)
    init_digest: str = ""               # digest of init's training record (set by train_family)
    dev_questions: int = 200            # held-out accuracy (every eval_every and at the end)
    eval_every: int = 200
    ckpt_every: int = 200
    seed: int = 0
    out: str = "runs/vlm"
    mesh: str | None = None             # e.g. "data=2,expert=4" (moex.nn.sharding); None: 1 device

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out) / self.preset

    def validate(self) -> "VLMTrainConfig":
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {sorted(ANSWER_FORMATS)}, found "
                             f"{self.answer_format!r}")
        if not (0 <= self.likelihood_rate and 0 <= self.caption_rate
                and self.likelihood_rate + self.caption_rate <= 1):
            raise ValueError(f"likelihood_rate ({self.likelihood_rate}) and caption_rate "
                             f"({self.caption_rate}) must be >= 0 and sum to at most 1")
        if self.train_file is not None and self.caption_rate:
            raise ValueError("caption rows need the synthetic scenes; with train_file set "
                             "caption_rate to 0")
        if self.train_file is not None and self.dev_file is None:
            raise ValueError("train_file needs a dev_file (held-out accuracy on the same data)")
        return self


def split_files(run: VLMTrainConfig) -> tuple[pathlib.Path | None, pathlib.Path]:
    """(train TSV or None for fresh synthetic questions, dev TSV: the given one, else the
    synthetic dev split, written once)."""
    dev = run.dev_file or write_synthetic(run.data, SyntheticSpec(seed=run.seed))["mmbench/dev"]
    return (pathlib.Path(run.train_file) if run.train_file else None), pathlib.Path(dev)


# -- examples -------------------------------------------------------------------------------------

class Rows:
    """Token rows of the three kinds for one model and tokenizer, padded to one length."""

    def __init__(self, cfg, tokenizer, answer_format: str = "text"):
        self.cfg, self.tok, self.answer_format = cfg, tokenizer, answer_format
        self.n_img = cfg.vision.num_image_tokens

    def row(self, q, kind: str, scene_caption: str | None = None) -> tuple[list[int], int]:
        """(ids of prompt + target + EOS, number of target tokens incl. EOS)."""
        if kind == "choice":
            head, tail = build_prompt(q, "compact"), ANSWER_FORMATS[self.answer_format](q)
        elif kind == "likelihood":
            head, tail = likelihood_prompt(q), continuation(q.options[q.answer])
        else:
            head, tail = f"<image>{CAPTION_PROMPT}\nAnswer:", scene_caption
        ids = self.tok.encode(head, num_image_tokens=self.n_img)
        body = self.tok.encode(tail, bos=False) + [self.tok.eos_id]
        return ids + body, len(body)

    def batch(self, rows, images, length: int):
        """(ids, mask, images, targets, loss_mask) from [(ids, n_target)] and (B, H, W, C)."""
        seqs, n_target = zip(*rows)
        ids, mask = left_pad(list(seqs), self.tok.pad_id, length)
        targets = np.concatenate([ids[:, 1:], np.full((len(ids), 1), self.tok.pad_id)], 1)
        loss_mask = np.zeros(ids.shape, np.float32)
        for r, n in enumerate(n_target):       # position j predicts token j + 1
            loss_mask[r, length - 1 - n:length - 1] = 1
        return ids, mask, images, targets.astype(np.int32), loss_mask


def draw_kinds(rng: np.random.Generator, n: int, run: VLMTrainConfig) -> list[str]:
    u = rng.random(n)
    return [("caption" if x < run.caption_rate else
             "likelihood" if x < run.caption_rate + run.likelihood_rate else "choice") for x in u]


def _bucket(n: int, step: int = 8) -> int:
    return -(-n // step) * step


class FreshExamples:
    """Batches of fresh synthetic questions: example i of step s is a pure function of
    (seed, s, i)."""

    def __init__(self, cfg, tokenizer, run: VLMTrainConfig, image_size: int):
        self.cfg, self.run, self.image_size = cfg, run, image_size
        self.rows = Rows(cfg, tokenizer, run.answer_format)
        self.length = _bucket(max(self._longest_rows()))

    def _longest_rows(self):
        """Row lengths of the longest prompt and caption the generator can make: its longest
        question, hint and four longest option words, and four shapes of its longest words."""
        size = lambda w: len(self.rows.tok.encode(w, bos=False))
        longest = lambda words: max(words, key=size)
        options = sorted({*COLORS, *SHAPES, *COUNTS, *POSITIONS}, key=size)[-MAX_OPTIONS:]
        q = Question("", longest(question_texts()), tuple(options), 0, "color",
                     hint=longest(HINTS))
        scene = [Shape(longest(SHAPES), longest(COLORS), 0, 0, 1)] * 4
        return [len(self.rows.row(q, "choice")[0]), len(self.rows.row(q, "likelihood")[0]),
                len(self.rows.row(q, "caption", caption(scene, "count", self.image_size))[0])]

    def __call__(self, step: int):
        run, v = self.run, self.cfg.vision
        rng = np.random.default_rng([run.seed, step])
        drawn = fresh_questions(run.seed, step, run.batch_size, self.image_size,
                                run.category_weights)
        kinds = draw_kinds(rng, run.batch_size, run)
        rotations = rng.integers(0, 4, run.batch_size)
        rows, images = [], []
        for (q, image, shapes), kind, k in zip(drawn, kinds, rotations):
            text = caption(shapes, q.category, self.image_size) if kind == "caption" else None
            rows.append(self.rows.row(rotate(q, int(k)), kind, text))
            images.append(preprocess(image, v.image_size, v.image_mean, v.image_std))
        return self.rows.batch(rows, np.stack(images).astype(np.float32), self.length)


class SplitExamples:
    """Batches drawn (with replacement) from a fixed list of questions, images preprocessed once."""

    def __init__(self, questions, cfg, tokenizer, run: VLMTrainConfig):
        if run.caption_rate:
            raise ValueError("caption rows need synthetic scenes; set caption_rate to 0")
        self.questions, self.cfg, self.run = questions, cfg, run
        self.rows = Rows(cfg, tokenizer, run.answer_format)
        v = cfg.vision
        self.images = np.stack([preprocess(q.load_image(), v.image_size, v.image_mean,
                                           v.image_std) for q in questions]).astype(np.float32)
        self.length = _bucket(max(len(self.rows.row(rotate(q, k), kind)[0])
                                  for q in questions for kind in ("choice", "likelihood")
                                  for k in range(len(q.options))))

    def __call__(self, step: int):
        run = self.run
        rng = np.random.default_rng([run.seed, step])
        index = rng.integers(0, len(self.questions), run.batch_size)
        kinds = draw_kinds(rng, run.batch_size, run)
        rotations = rng.integers(0, 4, run.batch_size)
        rows = [self.rows.row(rotate(self.questions[i], int(k)), kind)
                for i, kind, k in zip(index, kinds, rotations)]
        return self.rows.batch(rows, self.images[index], self.length)


def vlm_loss(model, cfg):
    def loss_fn(params, batch):
        ids, mask, images, targets, loss_mask = batch
        logits, _, aux = model.apply({"params": params}, ids, mask, images)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        ce = (ce * loss_mask).sum() / loss_mask.sum()
        extra = aux_loss(aux, cfg)
        return ce + extra, {"ce": ce, "aux": extra}
    return loss_fn


def dev_accuracy(cfg, tokenizer, dev_questions):
    """Held-out plain accuracy of generated answers and of likelihood ranking (moex.eval), and
    the generated answers' accuracy per category."""
    answers = np.asarray([q.answer for q in dev_questions])
    categories = np.asarray([q.category for q in dev_questions])

    def evaluate(state) -> dict:
        scorer = Scorer(cfg, state.params, tokenizer, ScoreConfig(batch_size=50,
                                                                  max_new_tokens=4))
        out = {}
        for method in ("generate", "likelihood"):
            right = scorer.predict(dev_questions, method) == answers
            out[f"dev_{method}"] = float(np.mean(right))
            if method == "generate":
                out.update({f"dev_{c}": float(np.mean(right[categories == c]))
                            for c in CATEGORIES if (categories == c).any()})
        return out
    return evaluate


def initial_params(run: VLMTrainConfig, cfg):
    """Random init, or the `init` checkpoint upcycled to cfg's MoE layout (same shapes: as is)."""
    if run.init is None:
        return init_params(cfg, run.seed)
    src_cfg, params, _ = checkpoint.load(run.init, as_numpy=True)
    return jax.tree.map(jnp.asarray, upcycle_params(src_cfg, params, cfg, seed=run.seed)
                        if src_cfg != cfg else params)


def train_vlm(run: VLMTrainConfig, progress: bool = True, stop_at: int | None = None):
    """Train (resuming from run_dir/train), save run_dir/model; returns (params, log)."""
    run = run.validate()
    cfg = get_config(run.preset)
    if cfg.vision is None:
        raise ValueError(f"{run.preset} has no vision tower; train_vlm trains VLMs")
    plan = sharding.plan_for(run.mesh)   # fails early
    claim_run_dir(run.run_dir, run)
    train_file, dev_file = split_files(run)
    dev_q = read_mmbench(dev_file)[:run.dev_questions]
    tokenizer = tokenizer_for(cfg)
    if train_file is None:
        examples = FreshExamples(cfg, tokenizer, run, SyntheticSpec(seed=run.seed).image_size)
    else:
        examples = SplitExamples(read_mmbench(train_file), cfg, tokenizer, run)
    tcfg = train_model_config(cfg, run.train_capacity_factor)
    optimizer = adamw(run.lr, run.warmup, run.steps, run.weight_decay)
    state = TrainState.sharded(cfg, initial_params(run, cfg), optimizer, plan)
    step = make_step(vlm_loss(build(tcfg), tcfg), optimizer, plan, plan and state.shardings())
    draw = lambda i: tuple(jnp.asarray(x) for x in examples(i))
    state, log = fit(state, step, draw, run.steps, ckpt_dir=run.run_dir / "train",
                     ckpt_every=run.ckpt_every, desc=f"vlm {run.preset}", progress=progress,
                     evaluate=dev_accuracy(cfg, tokenizer, dev_q), eval_every=run.eval_every,
                     stop_at=stop_at, plan=plan)
    if hasattr(tokenizer, "tokenizer"):            # a tokenizers model: saved with the weights
        write_tokenizer(tokenizer, run.run_dir)
    publish_model(run.run_dir, state, run.steps, cfg,
                  {"trained": f"multiple choice on {train_file or 'fresh synthetic questions'}",
                   "config": dataclasses.asdict(run)}, log, copy_from=run.run_dir)
    return state.params, log


def trained_model(run: VLMTrainConfig, progress: bool = True):
    """(cfg, params, model dir) of the model `run` trains: loaded from run_dir/model when this
    config has trained it before (the cache), else trained now."""
    model_dir = trained_model_dir(run.run_dir, run, lambda: train_vlm(run, progress=progress))
    cfg, params, _ = checkpoint.load(model_dir)
    return cfg, params, model_dir


# -- the default recipe: dense first, then upcycle and fine-tune ----------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """How `train_family` trains FAMILY-dense, -hard and -soft: the dense model from scratch;
    each MoE model sparsely upcycled from it (when its preset is an upcycling of the dense one,
    `moex.upcycle.check_upcyclable`; else from scratch, with the dense step count) and fine-tuned."""

    dense_steps: int = 900
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    finetune_warmup: int = 20
    batch_size: int = 64
    seed: int = 0
    data: str = "runs/data/synthetic"
    dev_file: str | None = None         # held-out split (default: the synthetic dev split)
    dev_questions: int = 200
    out: str = "runs/vlm"

    def dense(self, family: str) -> VLMTrainConfig:
        return VLMTrainConfig(preset=f"{family}-dense", data=self.data, dev_file=self.dev_file,
                              steps=self.dense_steps, batch_size=self.batch_size,
                              dev_questions=self.dev_questions, seed=self.seed, out=self.out)

    def moe(self, family: str, kind: str, dense_dir: pathlib.Path | None) -> VLMTrainConfig:
        base = dataclasses.replace(self.dense(family), preset=f"{family}-{kind}")
        if dense_dir is None:
            return base
        return dataclasses.replace(base, steps=self.finetune_steps, lr=self.finetune_lr,
                                   warmup=self.finetune_warmup, init=str(dense_dir),
                                   eval_every=max(1, self.finetune_steps // 2),
                                   init_digest=record_digest(dense_dir))


def record_digest(model_dir) -> str:
    """A short digest of a trained checkpoint's training record (its moex.json config), so a
    model fine-tuned from it is never reused for another dense model in the same folder."""
    import hashlib
    record = checkpoint.metadata(model_dir).get("config", {})
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def upcyclable(family: str, kind: str) -> bool:
    try:
        check_upcyclable(get_config(f"{family}-dense"), get_config(f"{family}-{kind}"))
    except (ValueError, KeyError):
        return False
    return True


def train_family(family: str, recipe: Recipe = Recipe(), progress: bool = True):
    """[(cfg, params, model dir)] of FAMILY-dense, -hard, -soft trained by `recipe` (each
    cached in its run folder)."""
    cfg, params, dense_dir = trained_model(recipe.dense(family), progress)
    out = [(cfg, params, dense_dir)]
    for kind in ("hard", "soft"):
        init = dense_dir if upcyclable(family, kind) else None
        out.append(trained_model(recipe.moe(family, kind, init), progress))
    return out
