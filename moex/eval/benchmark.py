"""Benchmark scores of a model: MMBench (CircularEval and plain accuracy) and SEED-Bench
(likelihood ranking and generated letter), per category, with the questions/s of each run.

    scorer = Scorer(cfg, params)
    mm = evaluate_mmbench(scorer, read_mmbench("MMBench_DEV_EN.tsv"))
    seed = evaluate_seed(scorer, read_seedbench("SEED-Bench.json", "SEED-Bench-image"))
    print(markdown({**mm["tables"], **seed["tables"]}))
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from moex.data.records import Question
from moex.eval.circular import circular_questions, circular_score, markdown, plain_accuracy
from moex.eval.scorer import Scorer


def _timed(scorer: Scorer, questions, method: str):
    start = time.perf_counter()
    preds = scorer.predict(questions, method)
    return preds, len(questions) / (time.perf_counter() - start)


def evaluate_mmbench(scorer: Scorer, questions: Sequence[Question],
                     method: str = "generate") -> dict:
    """CircularEval over every rotation, and plain accuracy on the un-rotated questions (the
    rotation-0 answers of the same run)."""
    asked = circular_questions(questions)
    preds, qps = _timed(scorer, asked, method)
    first = [i for i, q in enumerate(asked) if q.rotation == 0]
    return {"tables": {"mmbench_circular": circular_score(asked, preds),
                       "mmbench_plain": plain_accuracy([asked[i] for i in first], preds[first])},
            "questions_per_s": {"mmbench": qps}, "method": method}


def evaluate_seed(scorer: Scorer, questions: Sequence[Question]) -> dict:
    """Likelihood ranking of the option texts, and the generated letter."""
    tables, qps = {}, {}
    for method in ("likelihood", "generate"):
        preds, qps[f"seed_{method}"] = _timed(scorer, questions, method)
        tables[f"seed_{method}"] = plain_accuracy(questions, preds)
    return {"tables": tables, "questions_per_s": qps}


def chance(questions: Sequence[Question], circular: bool = False) -> float:
    """Expected accuracy of uniform guessing: mean 1/N; with CircularEval all N rotations must be
    right, by independent guesses (1/N)^N."""
    n = np.asarray([len(q.options) for q in questions], float)
    return float(np.mean(n ** -n if circular else 1 / n))


__all__ = ["evaluate_mmbench", "evaluate_seed", "chance", "markdown"]
