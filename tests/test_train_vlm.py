"""moex.train_vlm: rows put the loss on exactly the target tokens; fresh examples are a pure
function of the step; a small word-level VLM learns the synthetic benchmark above chance within
seconds; training resumes bit-exactly (also from an upcycled start); the recipe upcycles."""

import dataclasses

import jax
import numpy as np
import pytest

from moex import checkpoint
from moex.config import (PRESETS, DecoderConfig, MoEConfig, ProjectorConfig, VisionConfig,
                         VLMConfig, get_config)
from moex.data import SyntheticSpec, generate_questions, rotate, write_synthetic
from moex.data.vocab import tokenizer_for
from moex.train_vlm import (FreshExamples, Recipe, Rows, VLMTrainConfig, draw_kinds,
                            train_family, train_vlm, trained_model)

# a word-level family small enough for tests: 32 px / 8 px patches = 16 image tokens, d 64
_VISION = VisionConfig(image_size=48, patch_size=8, d_model=128, num_layers=2, num_heads=4,
                       mlp_dim=256, class_token=False, drop_class_token=False, feature_layer=-1)
_DECODER = DecoderConfig(vocab_size=80, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         ffn_dim=128, max_seq_len=256)
_WORDS = dict(tokenizer="synthetic-words", image_token_id=4, pad_token_id=0, eos_token_id=2)


def _test_family():
    dense = VLMConfig("wtest-dense", _DECODER, _VISION, ProjectorConfig(hidden_dim=128), **_WORDS)
    hard = dense.replace(name="wtest-hard", decoder=dataclasses.replace(
        _DECODER, moe=MoEConfig(kind="hard", num_experts=4, top_k=2, expert_dim=128)))
    soft = dense.replace(name="wtest-soft", decoder=dataclasses.replace(
        _DECODER, moe=MoEConfig(kind="soft", num_experts=4, expert_dim=32)),
        vision=dataclasses.replace(_VISION, moe=MoEConfig(
            kind="soft", num_experts=4, expert_dim=256, soft_slots=9, every_n=2,
            layer_offset=1)))
    return {c.name: (lambda c=c: c) for c in (dense, hard, soft)}


@pytest.fixture(autouse=True)
def test_family(monkeypatch):
    for name, fn in _test_family().items():
        monkeypatch.setitem(PRESETS, name, fn)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(root, SyntheticSpec(seed=0, n_train=64, n_dev=96))
    return root


@pytest.mark.parametrize("fmt", ["text", "letter", "text-letter"])
def test_loss_mask_covers_exactly_the_targets(fmt):
    cfg = get_config("wtest-dense")
    tok = tokenizer_for(cfg)
    rows = Rows(cfg, tok, fmt)
    questions = generate_questions(6, seed=3)
    want = {"text": lambda q: q.options[q.answer], "letter": lambda q: q.answer_letter,
            "text-letter": lambda q: f"{q.options[q.answer]} ( {q.answer_letter} )"}
    for kind in ("choice", "likelihood", "caption"):
        made = [rows.row(rotate(q, i), kind, " 1 shapes : red circle top left")
                for i, q in enumerate(questions)]
        ids, mask, _, targets, loss_mask = rows.batch(made, np.zeros((6, 48, 48, 3)), 96)
        for r, q in enumerate(questions):
            rq = rotate(q, r)
            got = targets[r][loss_mask[r] > 0]
            text = {"choice": want[fmt](rq), "likelihood": rq.options[rq.answer],
                    "caption": "1 shapes : red circle top left"}[kind]
            assert tok.decode(got[:-1]) == text and got[-1] == tok.eos_id
            np.testing.assert_array_equal(targets[r, :-1], ids[r, 1:])
            assert mask[r, -1] == 1 and ids[r, -1] == tok.eos_id


def test_fresh_examples_are_a_pure_function_of_the_step():
    cfg = get_config("wtest-dense")
    tc = VLMTrainConfig(preset="wtest-dense", batch_size=12, caption_rate=0.3)
    ex = FreshExamples(cfg, tokenizer_for(cfg), tc, 64)
    a, b, c = ex(5), ex(5), ex(6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (12, ex.length) and a[2].shape == (12, 48, 48, 3)
    kinds = draw_kinds(np.random.default_rng(0), 4000, tc)
    assert abs(kinds.count("caption") / 4000 - 0.3) < 0.03
    assert abs(kinds.count("likelihood") / 4000 - tc.likelihood_rate) < 0.03
    with pytest.raises(ValueError, match="sum to at most 1"):
        VLMTrainConfig(likelihood_rate=0.6, caption_rate=0.6).validate()


def _tc(tmp_path, data, **kw):
    base = dict(preset="wtest-dense", dev_file=str(data / "mmbench" / "dev.tsv"), steps=40, batch_size=32, lr=3e-3,
                warmup=5, dev_questions=96, eval_every=0, ckpt_every=20,
                out=str(tmp_path / "runs"))
    return VLMTrainConfig(**{**base, **kw})


def test_a_small_word_level_vlm_learns_within_seconds(tmp_path, data):
    """Learning, not timing: 40 steps of fresh colour questions lift held-out colour questions
    from chance to clearly above it, and the saved model carries its tokenizer."""
    tc = _tc(tmp_path, data, category_weights=(1, 0, 0, 0))
    params, log = train_vlm(tc, progress=False)
    assert log[-1]["ce"] < log[0]["ce"]
    assert log[-1]["dev_color"] >= 0.7           # chance: ~0.3 (2-4 options of 6 colours)
    assert log[-1]["dev_likelihood"] > 0.45      # chance over all categories: ~0.36
    cfg, loaded, tokenizer = checkpoint.load(tc.run_dir / "model")
    assert cfg == get_config("wtest-dense") and tokenizer is not None
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tokenizer_for(cfg, tc.run_dir / "model").encode("red") == \
        tokenizer_for(cfg).encode("red")
    # the cache: the same config loads this model; another config is refused, not reused
    _, cached, model_dir = trained_model(tc, progress=False)
    assert model_dir == tc.run_dir / "model"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(cached)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"lr=0.001 \(folder: 0.003\)"):
        trained_model(dataclasses.replace(tc, lr=1e-3), progress=False)


def test_resumed_training_is_bit_exact(tmp_path, data):
    """The hard model started from a dense checkpoint (the recipe's fine-tuning): a run stopped
    at step 8 and resumed ends bit-identical to one that ran through. (A fresh start takes the
    same save / restore path; test_recipe_upcycles_the_dense_model trains one.)"""
    from moex.model import init_params
    init = tmp_path / "dense"
    checkpoint.save(init, get_config("wtest-dense"), init_params("wtest-dense", 4))
    kw = dict(preset="wtest-hard", steps=12, ckpt_every=4, dev_questions=8, init=str(init))
    full, _ = train_vlm(_tc(tmp_path / "a", data, **kw), progress=False)
    stopped = _tc(tmp_path / "b", data, **kw)
    train_vlm(stopped, progress=False, stop_at=8)
    assert not (stopped.run_dir / "model").exists()
    resumed, _ = train_vlm(stopped, progress=False)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_recipe_upcycles_the_dense_model(tmp_path, data):
    recipe = Recipe(dense_steps=6, finetune_steps=4, batch_size=8, out=str(tmp_path / "runs"),
                    dev_file=str(data / "mmbench" / "dev.tsv"), dev_questions=8)
    got = train_family("wtest", recipe, progress=False)
    assert [c.name for c, _, _ in got] == ["wtest-dense", "wtest-hard", "wtest-soft"]
    for (cfg, _, model_dir), kind in zip(got[1:], ("hard", "soft")):
        meta = checkpoint.metadata(model_dir)["config"]
        assert meta["init"] == str(got[0][2]) and meta["steps"] == 4 and meta["init_digest"]
        assert cfg.decoder.moe.kind == kind
    # the cache: a second call trains nothing and loads the same models
    again = train_family("wtest", recipe, progress=False)
    for (_, a, _), (_, b, _) in zip(got, again):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
