"""Train a preset VLM on a multiple-choice training split (the synthetic MMBench-format one by
default), so that its accuracy, and its routing, mean something.

    moex vlm train small-hard --steps 1500            # -> runs/vlm/small-hard/{train/, model/}

Every step draws `batch_size` training questions from (seed, step) (resumed runs are exact), each
with its options rotated by a random k, and trains one of two targets, alternating by step:

  letter       the "compact" prompt (question + lettered options) -> the answer's letter + EOS
               (what MMBench's letter / generated-letter scoring and CircularEval ask)
  likelihood   the question without options -> the answer's text + EOS (what SEED-Bench's
               likelihood ranking scores)

Loss: cross-entropy on the target tokens only, plus the config's load-balance and z losses.
Hard-MoE blocks train through the one-hot dispatch with a capacity factor (inference stays
dropless), as in `moex.predict.lm`. optax AdamW with warmup + cosine decay; orbax checkpoints with
resume (`moex.training.fit`); held-out letter accuracy on the dev split at the end. The trained
model is saved as a moex checkpoint with the preset's inference config.

A run folder (out/PRESET) belongs to the config that first trained in it (`run.json`):
`trained_model` loads its model as a cache, and a config that differs in anything but where output
goes or how often it logs is refused with the differing fields named, never silently reused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moex.config import get_config
from moex.data.images import preprocess
from moex.data.mmbench import read_mmbench
from moex.data.prompts import build_prompt, continuation, likelihood_prompt, rotate
from moex.data.synthetic import SyntheticSpec, write_synthetic
from moex.model import aux_loss, build, init_params
from moex.predict.lm import train_model_config
from moex.tokenizer import ByteTokenizer, left_pad
from moex.training import (TrainState, adamw, claim_run_dir, fit, make_step, publish_model,
                           trained_model_dir)

TARGETS = ("letter", "likelihood")
ANSWER_FORMATS = {"letter": lambda q: q.answer_letter,
                  "text-letter": lambda q: f" {q.options[q.answer]} ({q.answer_letter})"}


@dataclasses.dataclass(frozen=True)
class VLMTrainConfig:
    preset: str = "small-dense"
    data: str = "runs/data/synthetic"   # synthetic data root (written there if missing)
    train_file: str | None = None       # an MMBench-format TSV instead of the synthetic train split
    dev_file: str | None = None
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    answer_format: str = "text-letter"  # ANSWER_FORMATS
    likelihood_every: int = 2           # every n-th step trains the likelihood target (0: never)
    train_capacity_factor: float = 1.5
    dev_questions: int = 128            # held-out accuracy at the end (and every eval_every)
    eval_every: int = 100
    ckpt_every: int = 100
    seed: int = 0
    out: str = "runs/vlm"

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out) / self.preset


def split_files(tc: VLMTrainConfig) -> tuple[pathlib.Path, pathlib.Path]:
    """(train TSV, dev TSV): the given files, or the synthetic splits (generated once)."""
    if tc.train_file is not None:
        if tc.dev_file is None:
            raise ValueError("train_file needs a dev_file for held-out accuracy")
        return pathlib.Path(tc.train_file), pathlib.Path(tc.dev_file)
    paths = write_synthetic(tc.data, SyntheticSpec(seed=tc.seed))
    return paths["mmbench/train"], paths["mmbench/dev"]


class Examples:
    """Training rows from questions: token ids, loss masks and preprocessed images."""

    def __init__(self, questions, cfg, tokenizer=None, answer_format: str = "letter"):
        self.questions, self.cfg, self.answer_format = questions, cfg, answer_format
        self.tok = tokenizer or ByteTokenizer()
        v = cfg.vision
        self.images = np.stack([preprocess(q.load_image(), v.image_size, v.image_mean, v.image_std)
                                for q in questions]).astype(np.float32)
        self.lengths = {t: self._longest(t) for t in TARGETS}

    def _row(self, q, target: str) -> tuple[list[int], int]:
        """(ids of prompt + target + EOS, number of target tokens incl. EOS)."""
        n_img = self.cfg.vision.num_image_tokens
        if target == "letter":
            head, tail = build_prompt(q, "compact"), ANSWER_FORMATS[self.answer_format](q)
        else:
            head, tail = likelihood_prompt(q), continuation(q.options[q.answer])
        ids = self.tok.encode(head, num_image_tokens=n_img)
        body = self.tok.encode(tail, bos=False) + [self.tok.eos_id]
        return ids + body, len(body)

    def _longest(self, target: str) -> int:
        n = max(len(self._row(q, target)[0]) for q in self.questions)
        return -(-n // 32) * 32

    def batch(self, index, rotations, target: str):
        """(ids, mask, images, targets, loss_mask) for questions `index` rotated by `rotations`."""
        rows, n_target = zip(*[self._row(rotate(self.questions[i], int(k)), target)
                               for i, k in zip(index, rotations)])
        ids, mask = left_pad(list(rows), self.tok.pad_id, self.lengths[target])
        targets = np.concatenate([ids[:, 1:], np.full((len(ids), 1), self.tok.pad_id)], 1)
        loss_mask = np.zeros(ids.shape, np.float32)
        for r, n in enumerate(n_target):       # position j predicts token j + 1
            loss_mask[r, ids.shape[1] - 1 - n:ids.shape[1] - 1] = 1
        return ids, mask, self.images[np.asarray(index)], targets.astype(np.int32), loss_mask


def vlm_loss(model, cfg):
    def loss_fn(params, batch):
        ids, mask, images, targets, loss_mask = batch
        logits, _, aux = model.apply({"params": params}, ids, mask, images)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        ce = (ce * loss_mask).sum() / loss_mask.sum()
        extra = aux_loss(aux, cfg)
        return ce + extra, {"ce": ce, "aux": extra}
    return loss_fn


def step_target(tc: VLMTrainConfig, step: int) -> str:
    return "likelihood" if tc.likelihood_every and step % tc.likelihood_every == \
        tc.likelihood_every - 1 else "letter"


def batch_for(tc: VLMTrainConfig, examples: Examples):
    n = len(examples.questions)

    def draw(step: int):
        rng = np.random.default_rng([tc.seed, step])
        index = rng.integers(0, n, tc.batch_size)
        rotations = rng.integers(0, 4, tc.batch_size)
        return tuple(jnp.asarray(x) for x in examples.batch(index, rotations, step_target(tc, step)))
    return draw


def dev_accuracy(cfg, dev_questions):
    """Held-out plain accuracy of generated answers and of likelihood ranking (moex.eval)."""
    from moex.eval.scorer import ScoreConfig, Scorer
    answers = np.asarray([q.answer for q in dev_questions])

    def evaluate(state) -> dict:
        scorer = Scorer(cfg, state.params, sc=ScoreConfig(batch_size=32, max_new_tokens=12))
        return {f"dev_{m}": float(np.mean(scorer.predict(dev_questions, m) == answers))
                for m in ("generate", "likelihood")}
    return evaluate


def train_vlm(tc: VLMTrainConfig, progress: bool = True, stop_at: int | None = None):
    """Train (resuming from run_dir/train), save run_dir/model; returns (params, log)."""
    cfg = get_config(tc.preset)
    if cfg.vision is None:
        raise ValueError(f"{tc.preset} has no vision tower; train_vlm trains VLMs")
    claim_run_dir(tc.run_dir, tc)
    train_file, dev_file = split_files(tc)
    train_q, dev_q = read_mmbench(train_file), read_mmbench(dev_file)[:tc.dev_questions]
    tcfg = train_model_config(cfg, tc.train_capacity_factor)
    model = build(tcfg)
    optimizer = adamw(tc.lr, tc.warmup, tc.steps, tc.weight_decay)
    state = TrainState.create(init_params(cfg, tc.seed), optimizer)
    step = make_step(vlm_loss(model, tcfg), optimizer)
    state, log = fit(state, step, batch_for(tc, Examples(train_q, cfg, answer_format=tc.answer_format)), tc.steps,
                     ckpt_dir=tc.run_dir / "train", ckpt_every=tc.ckpt_every,
                     desc=f"vlm {tc.preset}", progress=progress,
                     evaluate=dev_accuracy(cfg, dev_q), eval_every=tc.eval_every, stop_at=stop_at)
    publish_model(tc.run_dir, state, tc.steps, cfg,
                  {"trained": f"multiple choice on {train_file}", "config": dataclasses.asdict(tc)},
                  log)
    return state.params, log


def trained_model(tc: VLMTrainConfig, progress: bool = True):
    """(cfg, params) of the model `tc` trains: loaded from run_dir/model when this config has
    trained it before (the cache), else trained now."""
    from moex import checkpoint
    model_dir = trained_model_dir(tc.run_dir, tc, lambda: train_vlm(tc, progress=progress))
    cfg, params, _ = checkpoint.load(model_dir)
    return cfg, params


# -- command line: moex vlm train | data, moex efficiency ------------------------------------------

def _train_cmd(a) -> int:
    tc = VLMTrainConfig(preset=a.preset, data=a.data, train_file=a.train_file,
                        dev_file=a.dev_file, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                        seed=a.seed, out=a.out)
    _, log = train_vlm(tc)
    print(json.dumps(log[-1]))
    print(f"model: {tc.run_dir / 'model'}")
    return 0


def _data_cmd(a) -> int:
    paths = write_synthetic(a.out, SyntheticSpec(seed=a.seed, n_train=a.train, n_dev=a.dev,
                                                 image_size=a.image_size))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def add_commands(sub) -> None:
    from moex.bench import efficiency
    d = VLMTrainConfig()
    vlm = sub.add_parser("vlm", help="multiple-choice VLM data and training").add_subparsers(
        dest="vlm", required=True)
    p = vlm.add_parser("train", help="train a preset VLM on MMBench-format questions")
    p.add_argument("preset")
    p.add_argument("--data", default=d.data, help="synthetic data root (written if missing)")
    p.add_argument("--train-file", help="MMBench-format TSV to train on instead")
    p.add_argument("--dev-file", help="MMBench-format TSV for held-out accuracy")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    p.set_defaults(fn=_train_cmd)
    s = SyntheticSpec()
    p = vlm.add_parser("data", help="write the synthetic MMBench / SEED-Bench splits")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=s.n_train)
    p.add_argument("--dev", type=int, default=s.n_dev)
    p.add_argument("--image-size", type=int, default=s.image_size)
    p.add_argument("--seed", type=int, default=s.seed)
    p.set_defaults(fn=_data_cmd)
    p = sub.add_parser("efficiency", help="the main experiment (experiments/vlm_efficiency.py)")
    efficiency.add_arguments(p)
    p.set_defaults(fn=efficiency.main)
