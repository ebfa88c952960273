"""MMBench CircularEval and plain accuracy, from predictions; per-category tables.

A prediction is the index of the chosen option in the question *as asked* (after rotation), or
-1 when no option could be read from the model's output.

CircularEval (MMBench): a question with N options is asked N times, its options rotated left by
0 .. N-1 places; it counts as correct only if every one of the N answers is. Plain accuracy counts
each asked question on its own (on the un-rotated questions it is MMBench's "vanilla" score).

    asked = circular_questions(questions)               # N rotations per question
    preds = scorer.letter_choice(asked)                 # (len(asked),) option indices
    table = circular_score(asked, preds)                # {"overall": .., "per_category": {..}}
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from moex.data.prompts import rotate
from moex.data.records import Question


def circular_questions(questions: Sequence[Question]) -> list[Question]:
    """Every question asked once per rotation of its options (rotations 0 .. N-1, in order)."""
    return [rotate(q, k) for q in questions for k in range(len(q.options))]


def _check(questions: Sequence[Question], predictions) -> np.ndarray:
    preds = np.asarray(predictions, np.int64)
    if preds.shape != (len(questions),):
        raise ValueError(f"expected one prediction per question ({len(questions)}), found shape "
                         f"{preds.shape}")
    missing = [q.qid for q in questions if q.answer is None]
    if missing:
        raise ValueError(f"{len(missing)} questions have no answer (e.g. {missing[0]!r}); a split "
                         "without answers cannot be scored here")
    return preds


def _table(keys: list[str], correct: list[bool]) -> dict:
    """{"overall": accuracy, "count": n, "per_category": {category: {"accuracy", "count"}}}."""
    per = collections.defaultdict(list)
    for k, c in zip(keys, correct):
        per[k].append(c)
    return {"overall": float(np.mean(correct)) if correct else float("nan"),
            "count": len(correct),
            "per_category": {k: {"accuracy": float(np.mean(v)), "count": len(v)}
                             for k, v in sorted(per.items())}}


def plain_accuracy(questions: Sequence[Question], predictions) -> dict:
    """Each asked question scored on its own."""
    preds = _check(questions, predictions)
    return _table([q.category for q in questions],
                  [bool(p == q.answer) for q, p in zip(questions, preds)])


def circular_score(questions: Sequence[Question], predictions) -> dict:
    """CircularEval over asked questions (as made by `circular_questions`): a question is correct
    only if all of its rotations are. Every rotation 0 .. N-1 of a question must be present once."""
    preds = _check(questions, predictions)
    groups: dict = collections.defaultdict(dict)
    cats: dict = {}
    for q, p in zip(questions, preds):
        if q.rotation in groups[q.qid]:
            raise ValueError(f"question {q.qid!r} is asked twice with rotation {q.rotation}")
        groups[q.qid][q.rotation] = bool(p == q.answer)
        cats[q.qid] = q.category
    n_opts = {q.qid: len(q.options) for q in questions}
    for qid, got in groups.items():
        if sorted(got) != list(range(n_opts[qid])):
            raise ValueError(f"question {qid!r} has {n_opts[qid]} options but was asked with "
                             f"rotations {sorted(got)}; CircularEval needs each of 0..{n_opts[qid] - 1}")
    qids = list(groups)
    return _table([cats[q] for q in qids], [all(groups[q].values()) for q in qids])


def markdown(tables: dict[str, dict]) -> str:
    """One row per category, one column per scored table (e.g. {"circular": .., "plain": ..})."""
    names = list(tables)
    cats = sorted({c for t in tables.values() for c in t["per_category"]})
    lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in cats:
        cells = [f"{t['per_category'][c]['accuracy']:.3f}" if c in t["per_category"] else "–"
                 for t in tables.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{t['overall']:.3f}**"
                                               for t in tables.values()) + " |")
    return "\n".join(lines)
