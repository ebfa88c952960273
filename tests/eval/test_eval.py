"""moex.eval: CircularEval and plain accuracy, letter parsing, likelihood ranking, and the model
scorer against an unpadded reference loop."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny
from moex.data import Question, continuation, likelihood_prompt, rotate
from moex.data.images import preprocess
from moex.eval import (Scorer, ScoreConfig, chance, circular_questions, circular_score,
                       parse_letter, plain_accuracy)
from moex.eval.scorer import continuation_logprob
from moex.tokenizer import ByteTokenizer


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def q(qid, options, answer, category="color", **kw):
    return Question(qid, "What color?", tuple(options), answer, category,
                    image_bytes=_png(), **kw)


def test_circular_right_on_three_of_four_rotations_scores_zero():
    a = q("1", ["red", "green", "blue", "yellow"], 0)       # answer "red"
    b = q("2", ["left", "right"], 1, category="position")
    asked = circular_questions([a, b])
    assert [x.rotation for x in asked] == [0, 1, 2, 3, 0, 1]
    # rotation k of a: options rotated left by k, so "red" sits at index (0 - k) % 4
    preds_a = [0, 3, 2, 0]              # right, right, right, wrong (red is at 1 in rotation 3)
    preds_b = [1, 0]                    # both right
    table = circular_score(asked, preds_a + preds_b)
    assert table["per_category"]["color"] == {"accuracy": 0.0, "count": 1}
    assert table["per_category"]["position"] == {"accuracy": 1.0, "count": 1}
    assert table["overall"] == 0.5
    plain = plain_accuracy(asked, preds_a + preds_b)
    assert plain["overall"] == pytest.approx(5 / 6)
    assert plain["per_category"]["color"]["accuracy"] == 0.75
    # all four right -> 1
    assert circular_score(asked[:4], [0, 3, 2, 1])["overall"] == 1.0


def test_circular_rejects_missing_or_repeated_rotations():
    a = q("1", ["red", "green", "blue"], 0)
    asked = circular_questions([a])
    with pytest.raises(ValueError, match="rotations \\[0, 1\\]"):
        circular_score(asked[:2], [0, 2])
    with pytest.raises(ValueError, match="asked twice"):
        circular_score(asked + asked[:1], [0, 2, 1, 0])
    with pytest.raises(ValueError, match="one prediction per question"):
        circular_score(asked, [0, 1])
    with pytest.raises(ValueError, match="no answer"):
        plain_accuracy([q("9", ["a", "b"], None)], [0])


def test_chance():
    qs = [q("1", ["a", "b"], 0), q("2", ["a", "b", "c", "d"], 0)]
    assert chance(qs) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert chance(qs, circular=True) == pytest.approx((1 / 4 + 1 / 256) / 2)


OPTIONS = ("red", "green", "blue", "yellow")


@pytest.mark.parametrize("text,want", [
    # the option rule: exactly one of the question's letters as a word
    ("B", 1), (" C.", 2), ("(A) red", 0), ("green (B)", 1), ("D", 3), ("B.", 1), ("(C)", 2),
    ("[D]", 3), ("B:", 1), ("Answer: D", 3), ("Option B", 1), ("I think B", 1),
    ("**C**", 2), ("{A}", 0), ("B!", 1), ("My choice: (C).", 2), ("#B", 1),
    ("The best option here is C; it matches.", 2),
    # the "answer is" rule, before the option rule
    ("The answer is D.", 3), ("The correct answer is **B**", 1), ("the answer is (A)", 0),
    ("A is wrong, so the answer is B.", 1), ("ANSWER IS C", 2),
    # several letters: no option; then the option text rule
    ("B and C", -1), ("A. or B.", -1), ("maybe A. or B.", -1), ("B or C, not sure", -1),
    ("B and C are both blue", 2),
    # the option text rule (one option's text in the answer, any case)
    ("blue", 2), ("Blue sky", 2), ("It is YELLOW.", 3), ("red or green", -1),
    # nothing, refusals, letters outside the question, letters inside words
    ("nothing", -1), ("", -1), ("Cannot determine the answer", -1),
    ("Sorry, I can't help with images of people yet.", -1), ("E", -1), ("Bee", -1),
    ("ABC", -1),
])
def test_parse_letter_follows_vlmevalkit_rules(text, want):
    assert parse_letter(text, 4, OPTIONS) == want


def test_parse_letter_uses_only_the_questions_letters():
    assert parse_letter("C", 2, ("red", "green")) == -1          # C is not an option here
    assert parse_letter("I think B", 2, ("red", "green")) == 1
    assert parse_letter("the answer is C", 3, ("x", "y", "z")) == 2


def test_continuation_logprob_hand_example():
    # V = 3, T = 4; row 0's continuation is its last 2 tokens, row 1's its last 1
    lp = np.log(np.asarray([
        [[.2, .3, .5], [.1, .8, .1], [.6, .2, .2], [1 / 3, 1 / 3, 1 / 3]],
        [[.5, .4, .1], [.3, .3, .4], [.25, .25, .5], [1 / 3, 1 / 3, 1 / 3]],
    ]))
    ids = np.asarray([[0, 2, 1, 0], [1, 1, 0, 2]])
    got = continuation_logprob(lp, ids, np.asarray([2, 1]))
    # row 0: tokens 1 (p=.8 at position 1) and 0 (p=.6 at position 2); row 1: token 2 (p=.5)
    np.testing.assert_allclose(got, [(np.log(.8) + np.log(.6)) / 2, np.log(.5)], rtol=1e-6)


def _reference_rows(cfg, model, params, prompts):
    """Rows right-padded (positions from 0; causal attention never sees the padding), one
    forward: (ids, log-softmax at every position) per row."""
    tok, v = ByteTokenizer(), cfg.vision
    seqs = [tok.encode(text, num_image_tokens=v.num_image_tokens)
            + (tok.encode(cont, bos=False) if cont else []) for text, cont, _ in prompts]
    t = max(map(len, seqs))
    ids = np.full((len(seqs), t), tok.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    imgs = np.stack([preprocess(question.load_image(), v.image_size, v.image_mean, v.image_std)
                     for _, _, question in prompts])
    logits = jax.jit(lambda p, i, m, im: model.apply({"params": p}, i, m, im)[0])(
        params, ids, mask, imgs)
    lp = np.asarray(jax.nn.log_softmax(logits))
    return [(s, lp[r, :len(s)]) for r, s in enumerate(seqs)]


def test_scorer_matches_unpadded_reference():
    cfg, model, params = tiny("tiny-hard")
    qs = [q("1", ["red", "green", "blue"], 0, hint="Look."), q("2", ["purple", "orange"], 1),
          q("3", ["a circle", "a square", "a tall triangle", "x"], 2, category="shape")]
    sc = Scorer(cfg, params, settings=ScoreConfig(batch_size=2, bucket=16))
    # likelihood ranking: mean log-prob of each option's text after the question
    got = sc.option_loglik(qs)
    prompts = [(likelihood_prompt(x), continuation(o), x) for x in qs for o in x.options]
    rows = iter(_reference_rows(cfg, model, params, prompts))
    for question, scores in zip(qs, got):
        want = []
        for o in question.options:
            ids, lp = next(rows)
            n = len(continuation(o).encode())
            want.append(np.mean([lp[j - 1, ids[j]] for j in range(len(ids) - n, len(ids))]))
        np.testing.assert_allclose(scores, want, atol=1e-4)
    assert list(sc.predict(qs, "likelihood")) == [int(np.argmax(s)) for s in got]
    # letter logits: the next-token log-probs of the option letters after the prompt
    from moex.data import build_prompt
    letters = sc.letter_logprobs(qs)
    rows = _reference_rows(cfg, model, params, [(build_prompt(x, "compact"), "", x) for x in qs])
    for question, lps, (ids, lp) in zip(qs, letters, rows):
        want = [lp[-1, ord(x)] for x in question.letters]
        np.testing.assert_allclose(lps, want, atol=1e-4)


def test_rotation_moves_the_letter_the_model_must_pick():
    a = q("1", ["red", "green", "blue"], 0)
    for k in range(3):
        r = rotate(a, k)
        assert r.options[r.answer] == "red"
