"""moex.train_vlm: training rows put the loss on exactly the target tokens; a few steps on a tiny
preset lower the loss on the training questions and save a loadable checkpoint."""

import dataclasses

import numpy as np
import pytest

from moex import checkpoint
from moex.config import get_config
from moex.data import SyntheticSpec, generate_questions
from moex.tokenizer import ByteTokenizer
from moex.train_vlm import Examples, VLMTrainConfig, step_target, train_vlm, trained_model


@pytest.fixture(scope="module")
def questions():
    return generate_questions(8, seed=3, image_size=32)


@pytest.mark.parametrize("fmt", ["letter", "text-letter"])
def test_loss_mask_covers_exactly_the_targets(questions, fmt):
    cfg = get_config("tiny-dense")
    ex = Examples(questions, cfg, answer_format=fmt)
    tok = ByteTokenizer()
    for target in ("letter", "likelihood"):
        rotations = np.arange(len(questions)) % 3
        ids, mask, images, targets, loss_mask = ex.batch(np.arange(len(questions)), rotations,
                                                         target)
        assert ids.shape[1] == ex.lengths[target] and ids.shape[1] % 32 == 0
        assert images.shape == (len(questions), 32, 32, 3)
        for r, q in enumerate(questions):
            from moex.data import rotate
            rq = rotate(q, int(rotations[r]))
            want = (rq.answer_letter if fmt == "letter" else
                    f" {rq.options[rq.answer]} ({rq.answer_letter})") if target == "letter" \
                else f" {rq.options[rq.answer]}"
            got = targets[r][loss_mask[r] > 0]
            assert tok.decode(got[:-1]) == want and got[-1] == tok.eos_id
            # the target row is the next token of the input row
            np.testing.assert_array_equal(targets[r, :-1], ids[r, 1:])
            assert mask[r, -1] == 1 and ids[r, -1] == tok.eos_id


def test_step_targets_alternate():
    tc = VLMTrainConfig(likelihood_every=2)
    assert [step_target(tc, i) for i in range(4)] == ["letter", "likelihood"] * 2
    assert {step_target(dataclasses.replace(tc, likelihood_every=0), i) for i in range(4)} == \
        {"letter"}


def test_tiny_training_lowers_loss_and_saves(tmp_path):
    from moex.data.synthetic import write_synthetic
    paths = write_synthetic(tmp_path / "data", SyntheticSpec(seed=0, n_train=64, n_dev=8))
    tc = VLMTrainConfig(preset="tiny-dense", train_file=str(paths["mmbench/train"]),
                        dev_file=str(paths["mmbench/dev"]), steps=24, batch_size=8, lr=3e-3,
                        warmup=4, dev_questions=8, eval_every=0, ckpt_every=12,
                        out=str(tmp_path / "runs"))
    params, log = train_vlm(tc, progress=False)
    first, last = log[0]["ce"], log[-1]["ce"]
    assert last < first
    assert {"dev_generate", "dev_likelihood"} <= set(log[-1])
    cfg, loaded, meta = checkpoint.load(tc.run_dir / "model")
    assert cfg == get_config("tiny-dense")
    import jax
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the cache: the same config loads this model; another config is refused, not reused
    _, cached = trained_model(tc, progress=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(cached)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"lr=0.001 \(folder: 0.003\)"):
        trained_model(dataclasses.replace(tc, lr=1e-3), progress=False)
