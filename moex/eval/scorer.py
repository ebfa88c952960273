"""Answering multiple-choice questions with a model, three ways.

    scorer = Scorer(cfg, params)                         # byte tokenizer, "compact" prompts
    preds = scorer.predict(questions, "letter")          # (Q,) chosen option index, -1 = none

  letter       one forward over the prompt; the option whose letter token has the highest
               next-token log-probability (restricted to the question's letters)
  generate     greedy generation of up to `max_new_tokens`; the letter is read from the text by
               the rules of VLMEvalKit's matcher (`parse_letter`); -1 when nothing matches
  likelihood   SEED-Bench's protocol: each option's text is scored after the question (without
               the options) by its mean per-token log-probability; the best option wins

Rows are padded to `batch_size` (repeating the last question) and prompts to a multiple of
`bucket` tokens, so a scoring run compiles a handful of shapes, not one per batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moex.data.batching import batches, encode_batch
from moex.data.images import preprocess
from moex.data.prompts import continuation, likelihood_prompt
from moex.data.records import Question
from moex.model import build
from moex.tokenizer import ByteTokenizer, left_pad
from moex.generate import generator_for

METHODS = ("letter", "generate", "likelihood")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    style: str = "compact"          # prompt style (moex.data.prompts.STYLES)
    template: str = "{prompt}"      # chat template around the prompt
    batch_size: int = 16
    bucket: int = 32                # prompt lengths padded up to a multiple of this
    mode: str = "crop"              # image preprocessing (moex.data.images.MODES)
    max_new_tokens: int = 4         # "generate"


REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
PUNCTUATION = ".()[],:;!*#{}"          # read as spaces before splitting into words


def parse_letter(text: str, n_options: int, options: Sequence[str] = ()) -> int:
    """The option a free-text answer names, by the rule-based stage of VLMEvalKit's matcher
    (MMBench's official toolkit), written from its documented behaviour; -1 when none.

    0. refusal: a known refusal phrase (REFUSALS) answers nothing;
    1. "answer is X": the word right after the last "answer is" (PUNCTUATION read as spaces),
       when it is one of the question's letters ("The correct answer is **B**");
    2. option (VLMEvalKit's `can_infer_option`): PUNCTUATION read as spaces, the text split into
       words; exactly one of the question's letters among the words is the answer ("Answer: D",
       "Option B", "I think B", "(B) red"); two or more ("B and C") answer nothing here;
    3. text (`can_infer_text`): the one option whose text (lower case) occurs in the answer
       (lower case); none or several answer nothing.
    Deliberate differences: VLMEvalKit's reject answer 'Z' is -1 here (no answer) as any other
    unparsed answer; rule 1 is applied before rule 2, so "A is wrong, the answer is B" is B where
    VLMEvalKit's option rule alone finds two letters.
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_options]
    if any(r in text for r in REFUSALS):
        return -1
    spaced = text
    for c in PUNCTUATION:
        spaced = spaced.replace(c, " ")
    after = re.findall(r"answer\s+is\s+(\S+)", spaced, flags=re.IGNORECASE)
    if after and after[-1] in letters:
        return letters.index(after[-1])
    words = set(spaced.split())
    named = [c for c in letters if c in words]
    if len(named) == 1:
        return letters.index(named[0])
    low = text.lower()
    hits = [i for i, o in enumerate(options) if str(o).lower() and str(o).lower() in low]
    return hits[0] if len(hits) == 1 else -1


def next_token_logprobs(logprobs, ids):
    """(R, T - 1) log-probability of each next token: position j predicts token j + 1.
    logprobs (R, T, V) from one forward over ids (R, T); numpy or jax arrays."""
    return jnp.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]


def tail_means(token_lp: np.ndarray, cont_len: np.ndarray) -> np.ndarray:
    """(R,) mean of each row's last `cont_len[r]` next-token log-probabilities: the continuation's
    tokens T - c .. T - 1 are scored by positions T - c - 1 .. T - 2."""
    return np.asarray([token_lp[r, token_lp.shape[1] - c:].mean() for r, c in enumerate(cont_len)])


def continuation_logprob(logprobs: np.ndarray, ids: np.ndarray, cont_len: np.ndarray) -> np.ndarray:
    """(R,) mean log-probability of each row's last `cont_len[r]` tokens, from logprobs
    (R, T, V) of one forward over ids (R, T)."""
    return tail_means(np.asarray(next_token_logprobs(logprobs, ids)), cont_len)


class Scorer:
    def __init__(self, cfg, params, tokenizer=None, settings: ScoreConfig = ScoreConfig()):
        self.cfg, self.params, self.settings = cfg, params, settings
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        model = build(cfg)
        self.model = model
        self._last = jax.jit(lambda p, t, m, im: jax.nn.log_softmax(
            model.apply({"params": p}, t, m, im, None, True)[0][:, 0].astype(jnp.float32)))
        # gathered on device: only (R, T - 1) values come back, not (R, T, V) (V = 32k at 7B)
        self._token_lp = jax.jit(lambda p, t, m, im: next_token_logprobs(jax.nn.log_softmax(
            model.apply({"params": p}, t, m, im)[0].astype(jnp.float32)), t))
        self.letter_ids = np.asarray([self.tokenizer.encode(x, bos=False)[-1] for x in "ABCD"])

    # -- batching -------------------------------------------------------------------------------
    def _groups(self, questions: Sequence[Question]):
        """Fixed-size groups: (questions padded to batch_size by repeating the last, real count)."""
        for group in batches(questions, self.settings.batch_size):
            n = len(group)
            yield group + [group[-1]] * (self.settings.batch_size - n), n

    def _encode(self, group):
        b = encode_batch(group, self.tokenizer, self.cfg.vision, self.settings.style, mode=self.settings.mode,
                         template=self.settings.template, bucket=self.settings.bucket)
        return jnp.asarray(b.ids), jnp.asarray(b.mask), jnp.asarray(b.images)

    # -- the three methods ------------------------------------------------------------------------
    def letter_logprobs(self, questions: Sequence[Question]) -> list[np.ndarray]:
        """Per question, (N,) next-token log-probabilities of its option letters."""
        out = []
        for group, n in self._groups(questions):
            lp = np.asarray(self._last(self.params, *self._encode(group)))
            out += [lp[i, self.letter_ids[:len(q.options)]] for i, q in enumerate(group[:n])]
        return out

    def generate(self, questions: Sequence[Question]) -> list[str]:
        """Greedy completions (up to max_new_tokens, stopping at EOS), decoded."""
        gen, texts = generator_for(self.cfg), []
        for group, n in self._groups(questions):
            ids, mask, images = self._encode(group)
            res = gen(self.params, ids, mask, images, max_new_tokens=self.settings.max_new_tokens)
            texts += [self.tokenizer.decode(res.tokens[i, :res.num_generated[i]]) for i in range(n)]
        return texts

    def option_loglik(self, questions: Sequence[Question]) -> list[np.ndarray]:
        """Per question, (N,) mean log-probability of each option's text after the question."""
        rows = [(qi, q, oi) for qi, q in enumerate(questions) for oi in range(len(q.options))]
        scores = [np.zeros(len(q.options)) for q in questions]
        n_img, v = self.cfg.vision.num_image_tokens, self.cfg.vision
        tok = self.tokenizer
        images = {}     # question index -> preprocessed image, for the questions of this chunk
        for start in range(0, len(rows), self.settings.batch_size):
            chunk = rows[start:start + self.settings.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.settings.batch_size - n)
            seqs, conts = [], []
            for _, q, oi in chunk:
                head = tok.encode(self.settings.template.format(prompt=likelihood_prompt(q)),
                                  num_image_tokens=n_img)
                cont = tok.encode(continuation(q.options[oi]), bos=False)
                seqs.append(head + cont)
                conts.append(len(cont))
            length = -(-max(map(len, seqs)) // self.settings.bucket) * self.settings.bucket
            ids, mask = left_pad(seqs, tok.pad_id, length)
            # rows are in question order: keep only the image of the question carried over
            images = {qi: im for qi, im in images.items() if qi == chunk[0][0]}
            for qi, q, _ in chunk:
                if qi not in images:
                    images[qi] = preprocess(q.load_image(), v.image_size, v.image_mean,
                                            v.image_std, self.settings.mode)
            batch_images = np.stack([images[qi] for qi, _, _ in chunk]).astype(np.float32)
            token_lp = np.asarray(self._token_lp(self.params, jnp.asarray(ids),
                                                 jnp.asarray(mask), jnp.asarray(batch_images)))
            means = tail_means(token_lp, np.asarray(conts))
            for r, (qi, _, oi) in enumerate(chunk[:n]):
                scores[qi][oi] = means[r]
        return scores

    def predict(self, questions: Sequence[Question], method: str = "letter") -> np.ndarray:
        """(Q,) chosen option index per question (-1: no option could be read)."""
        if method == "letter":
            return np.asarray([int(np.argmax(s)) for s in self.letter_logprobs(questions)])
        if method == "likelihood":
            return np.asarray([int(np.argmax(s)) for s in self.option_loglik(questions)])
        if method == "generate":
            return np.asarray([parse_letter(t, len(q.options), q.options)
                               for t, q in zip(self.generate(questions), questions)])
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
