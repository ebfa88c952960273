"""Scoring multiple-choice benchmarks.

  circular    CircularEval (MMBench), plain accuracy, per-category tables (markdown)
  scorer      Scorer: a model answers by letter logits, by generation, or by likelihood ranking
  benchmark   evaluate_mmbench / evaluate_seed: the tables and questions/s of a model
"""

from moex.eval.benchmark import chance, evaluate_mmbench, evaluate_seed  # noqa: F401
from moex.eval.circular import (circular_questions, circular_score, markdown,  # noqa: F401
                                plain_accuracy)
from moex.eval.scorer import METHODS, ScoreConfig, Scorer, parse_letter  # noqa: F401
