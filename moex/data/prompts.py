"""Prompts for multiple-choice questions, and CircularEval's option rotation.

Styles (`STYLES`), shown for a question with a hint and two options:

  mmbench   <image>\\nHint: H\\nQuestion: Q\\nOptions:\\nA. a\\nB. b\\n
            Answer with the option's letter from the given choices directly.
  seed      <image>\\nH\\nQ\\nA. a\\nB. b\\nAnswer with the option's letter from the given choices
            directly.                        (SEED has no hints; one, if set, goes before Q)
  compact   <image>H Q\\nA. a\\nB. b\\nAnswer:   (byte-level models: every character is a token)

The mmbench and seed styles end with LLaVA's single-prediction instruction; the model answers with
a letter (`answer_text`).
"""

from __future__ import annotations

import dataclasses

from moex.data.records import Question

STYLES = ("mmbench", "seed", "compact")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def rotate(q: Question, k: int) -> Question:
    """Options rotated left by k (option k becomes A), answer remapped; `rotation` grows by k.

    k is taken modulo the number of options, so rotate(q, 0) == q and rotate(q, n) == q.
    """
    n = len(q.options)
    k %= n
    if k == 0:
        return q
    answer = None if q.answer is None else (q.answer - k) % n
    return dataclasses.replace(q, options=q.options[k:] + q.options[:k], answer=answer,
                               rotation=(q.rotation + k) % n)


def _option_lines(q: Question) -> str:
    return "".join(f"{letter}. {option}\n" for letter, option in zip(q.letters, q.options))


def build_prompt(q: Question, style: str = "mmbench", image_tag: str = "<image>") -> str:
    """The prompt text for `q` in `style`; `image_tag` "" leaves the image out (and its newline)."""
    if style == "mmbench":
        head = f"{image_tag}\n" if image_tag else ""
        hint = f"Hint: {q.hint}\n" if q.hint else ""
        return f"{head}{hint}Question: {q.question}\nOptions:\n{_option_lines(q)}{INSTRUCTION}"
    if style == "seed":
        head = f"{image_tag}\n" if image_tag else ""
        hint = f"{q.hint}\n" if q.hint else ""
        return f"{head}{hint}{q.question}\n{_option_lines(q)}{INSTRUCTION}"
    if style == "compact":
        hint = f"{q.hint} " if q.hint else ""
        return f"{image_tag}{hint}{q.question}\n{_option_lines(q)}Answer:"
    raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")


def answer_text(q: Question) -> str:
    """The training target: the correct option's letter, e.g. "B"."""
    if q.answer is None:
        raise ValueError(f"question {q.qid!r} has no answer (a test split?); cannot make a target")
    return q.answer_letter


def likelihood_prompt(q: Question, image_tag: str = "<image>") -> str:
    """The prompt for likelihood ranking (SEED-Bench's official protocol): the question without
    its options; each option's text (`continuation`) is then scored after it."""
    hint = f"{q.hint} " if q.hint else ""
    return f"{image_tag}{hint}{q.question}\nAnswer:"


def continuation(option: str) -> str:
    """The text scored (or trained) after `likelihood_prompt`: " " + the option."""
    return f" {option}"
