"""Routing signatures (moex.eval.routing): counts per category and block, and the two halves of
each category that give the within-category divergence."""

import numpy as np

from moex.config import get_config
from moex.data.synthetic import generate_questions
from moex.data.vocab import tokenizer_for
from moex.eval.routing import js_divergence, routing_usage, signature_rows
from moex.model import init_params


def test_js_divergence_bounds():
    p, q = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    assert js_divergence(p, p) == 0
    assert abs(js_divergence(p, q) - 1) < 1e-12
    assert 0 < js_divergence(p, np.full(4, 0.25)) < 1


def test_every_category_splits_into_two_nonempty_halves():
    """The dev split's categories take turns (question i is category i mod 4), so halves by the
    question's index would leave one half of every category empty; they go by each category's
    own count."""
    cfg = get_config("tiny-hard")
    questions = generate_questions(16, seed=3, image_size=32)
    usage = routing_usage(cfg, init_params(cfg, 0), tokenizer_for(cfg), questions, batch_size=8)
    halves = usage["halves"]                           # (blocks, C, 2, E)
    assert halves.shape[1:3] == (4, 2)
    assert (halves.sum(-1) > 0).all()
    assert (halves.sum(2) == usage["counts"]).all()
    for row in signature_rows(usage):
        assert 0 <= row["within_js"] < 0.5 and 0 <= row["between_js"] <= 1
