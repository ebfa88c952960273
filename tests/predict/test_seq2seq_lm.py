"""moex.predict.seq2seq_lm: span corruption (sentinels, exact reconstruction, determinism per
(seed, step)), the training loss (jitter, one-hot dispatch), training that lowers the held-out
loss and resumes exactly, the published model loading and generating, and `moex lm train`
dispatching on the preset's kind."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.checkpoint import load_model
from moex.config import EncDecConfig, get_config
from moex.model import build
from moex.predict.lm import LMTrainConfig
from moex.predict.seq2seq_lm import (Seq2SeqTrainConfig, SpanLayout, batch_for, corrupt, examples,
                                     heldout_batches, layout_of, noise_spans, restore,
                                     seq2seq_loss, split_target, train_model_config,
                                     train_seq2seq)
from moex.seq2seq import Seq2SeqGenerator

CFG = get_config("tiny-switch")
LIMIT = 30                                   # stdlib files read by the tests
RUN = Seq2SeqTrainConfig(preset="tiny-switch", steps=6, batch_size=4, seq_len=32, warmup=2,
                         lr=3e-3, eval_windows=2, ckpt_every=2, corpus_limit=LIMIT)


@given(length=st.integers(8, 200), density=st.floats(0.05, 0.5), mean=st.floats(1.0, 6.0),
       seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_noise_spans_cover_the_noise_in_separate_spans(length, density, mean, seed):
    try:
        layout = SpanLayout.of(CFG, length, density, mean)
    except ValueError:
        return                                              # too few bytes to mask or keep
    spans = noise_spans(np.random.default_rng(seed), layout)
    assert len(spans) == layout.spans <= 13 and sum(b - a for a, b in spans) == layout.noise
    assert all(a < b for a, b in spans) and spans[0][0] >= 0 and spans[-1][1] <= length
    assert all(b < a2 for (_, b), (a2, _) in zip(spans, spans[1:]))    # a kept byte between


def test_corruption_reconstructs_the_window_with_sentinels():
    layout = SpanLayout.of(CFG, 40, 0.15, 3.0)
    assert (layout.noise, layout.spans, layout.first_sentinel) == (6, 2, 259)
    window = np.frombuffer(b"def f(x):\n    return x + 1  # the answer\n", np.uint8)[:40]
    got = corrupt(window[None].astype(np.int32), layout, np.random.default_rng(1))
    enc, tgt, dec = got["enc"][0], got["target"][0], got["dec"][0]
    assert enc.shape == (layout.encoder_len,) == (36,) and tgt.shape == (layout.target_len,)
    assert enc[enc >= 256].tolist() == [259, 260] and tgt[-1] == CFG.eos_token_id
    assert tgt[tgt >= 256].tolist() == [259, 260, CFG.eos_token_id]
    assert dec[0] == CFG.decoder_start_token_id and (dec[1:] == tgt[:-1]).all()
    assert restore(enc, split_target(tgt, layout), layout) == window.tobytes()
    # 13 sentinels (259..271) cap the spans: 120 masked bytes of mean 2 would need 60
    many = SpanLayout.of(CFG, 400, 0.3, 2.0)
    assert many.spans == 13 and many.first_sentinel + many.spans == CFG.vocab_size
    with pytest.raises(ValueError, match="masks 0 of 4 bytes"):
        SpanLayout.of(CFG, 4, 0.05, 3.0)


def test_batches_are_a_function_of_seed_and_step():
    layout = layout_of(CFG, RUN)
    draw = batch_for(RUN, layout)
    a, b, c = draw(3), draw(3), draw(4)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b))
    assert not np.array_equal(a["enc"], c["enc"])
    assert not np.array_equal(a["rng"], c["rng"])
    other = batch_for(dataclasses.replace(RUN, seed=1), layout)(3)
    assert not np.array_equal(a["enc"], other["enc"])
    for enc, tgt in zip(np.asarray(a["enc"]), np.asarray(a["target"])):   # every row restores
        window = restore(enc, split_target(tgt, layout), layout)
        assert len(window) == RUN.seq_len


def test_training_loss_uses_jitter_and_the_one_hot_dispatch(trained):
    tcfg = train_model_config(CFG, 1.25)
    assert tcfg.encoder_moe.compute == tcfg.decoder_moe.compute == "dense"
    assert tcfg.encoder_moe.capacity_factor == 1.25 and tcfg.encoder_moe.expert_capacity is None
    batch = batch_for(RUN, layout_of(CFG, RUN))(0)
    loss = jax.jit(jax.value_and_grad(seq2seq_loss(build(tcfg), tcfg), has_aux=True))
    params = trained[1]
    ((a, ma), grads), ((b, _), _) = (loss(params, batch),
                                     loss(params, {**batch, "rng": batch["rng"] + 1}))
    assert float(a) != float(b)                             # jitter follows the batch's key
    assert float(ma["aux"]) > 0 and float(a) == pytest.approx(float(ma["ce"] + ma["aux"]))
    assert 0 <= float(ma["dropped"]) < 1
    router = grads["encoder"]["layer_1"]["ffn"]["router"]["kernel"]
    experts = grads["encoder"]["layer_1"]["ffn"]["experts"]
    assert float(jnp.abs(router).max()) > 0
    assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(experts))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = dataclasses.replace(RUN, out=str(tmp_path_factory.mktemp("s2s") / "a"))
    params, log = train_seq2seq(run, progress=False)
    return run, params, log


def test_training_lowers_the_heldout_loss(trained):
    _, _, log = trained
    first, last = log[0], log[-1]
    assert first["step"] == 0 and last["step"] == RUN.steps
    for d in ("code", "prose"):
        assert last[f"heldout_{d}"] < first[f"heldout_{d}"] - 0.5
        assert 0 <= last[f"span_acc_{d}"] <= 1
    assert {"experts_used_encoder1", "experts_used_encoder3", "experts_used_decoder1",
            "experts_used_decoder3", "top_share_decoder3"} <= set(last)


def test_resume_is_exact(trained, tmp_path):
    _, full, _ = trained
    part = dataclasses.replace(RUN, out=str(tmp_path / "b"))
    train_seq2seq(part, progress=False, stop_at=3)
    assert not (part.run_dir / "model").exists()
    resumed, log = train_seq2seq(part, progress=False)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), full, resumed))
    assert log[0]["step"] == 0 and log[-1]["step"] == RUN.steps
    with pytest.raises(ValueError, match=r"noise_density=0.3 \(folder: 0.15\)"):
        train_seq2seq(dataclasses.replace(part, noise_density=0.3), progress=False)


def test_saved_model_loads_and_generates(trained):
    run, params, _ = trained
    loaded = load_model(run.run_dir / "model")
    assert isinstance(loaded.cfg, EncDecConfig) and loaded.cfg == CFG    # inference config
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), loaded.params, params))
    layout = layout_of(CFG, run)
    enc = heldout_batches(run, layout)["code"]["enc"]
    gen = Seq2SeqGenerator(loaded.cfg)
    out = gen(loaded.params, enc, np.ones_like(enc), max_new_tokens=layout.target_len + 4)
    assert out.tokens.shape == (RUN.eval_windows, layout.target_len + 4)
    assert ((out.tokens >= 0) & (out.tokens < CFG.vocab_size)).all()
    report = examples(loaded.cfg, loaded.params, run, n=1, generator=gen)   # same shapes
    assert set(report) == {"code", "prose"} and gen.traces["start"] == 1
    assert set(report["code"]["rows"][0]) == {"input", "target", "greedy"}


def test_cli_dispatches_on_the_preset_kind(monkeypatch, capsys):
    from moex.cli import lm as cli_lm
    from moex.cli import main
    seen = []
    monkeypatch.setattr(cli_lm, "train_seq2seq",
                        lambda run: seen.append(run) or (None, [{"step": 0}, {"step": 3}]))
    monkeypatch.setattr(cli_lm, "examples", lambda *a, **k: {})
    monkeypatch.setattr(cli_lm, "train_lm", lambda run: seen.append(run) or (None, []))
    assert main(["lm", "train", "tiny-switch", "--steps", "3", "--noise-density", "0.2"]) == 0
    assert main(["lm", "train", "tiny-hard", "--steps", "3"]) == 0
    s2s, lm = seen
    assert s2s == Seq2SeqTrainConfig(preset="tiny-switch", steps=3, noise_density=0.2)
    assert lm == LMTrainConfig(preset="tiny-hard", steps=3)     # its own defaults
    assert "runs/lm/tiny-switch/model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="encoder-decoder.*drop --mesh"):
        main(["lm", "train", "tiny-switch", "--mesh", "data=1"])
