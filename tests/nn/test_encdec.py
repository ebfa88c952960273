"""The encoder-decoder (Switch / T5 layout): relative buckets, Switch routing with a fixed
capacity, cached decoding against teacher forcing, padding invariance of generation.
(Parity with transformers' SwitchTransformers: tests/convert/test_switch.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.config import EncDecConfig, get_config, switch_moe
from moex.model import build, init_params
from moex.nn import sharding
from moex.nn.moe import HardMoE
from moex.nn.relative import relative_bucket
from moex.nn.routing import route
from moex.seq2seq import Seq2SeqGenerator


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 12), (6, 7), (10, 33)])
def test_relative_buckets_equal_transformers(bidirectional, buckets, distance):
    import torch
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersAttention)
    r = np.arange(-700, 700)
    want = SwitchTransformersAttention._relative_position_bucket(
        torch.tensor(r), bidirectional=bidirectional, num_buckets=buckets,
        max_distance=distance).numpy()
    np.testing.assert_array_equal(relative_bucket(r, bidirectional, buckets, distance), want)


def test_switch_layer_selection_follows_transformers():
    """transformers: step = layers // sparse (layers when sparse is 0); block i sparse iff
    step > 0 and (i % step == 1 or step == 1)."""
    for layers, sparse in [(12, 6), (12, 3), (4, 4), (3, 1), (5, 2), (7, 3), (12, 0), (1, 0),
                           (3, 5)]:
        step = layers // sparse if sparse > 0 else layers
        want = [i for i in range(layers) if step > 0 and (i % step == 1 or step == 1)]
        moe = switch_moe(4, 8, layers, sparse)
        assert [i for i in range(layers) if moe.is_moe_layer(i)] == want
    assert switch_moe(4, 8, 3, 5).kind == "dense"


def _capacity_loop(ids, valid, capacity, count_padding):
    """Plain loop: per row, tokens in order, an expert keeps its first `capacity` tokens."""
    kept = np.zeros(ids.shape, bool)
    for g in range(ids.shape[0]):
        used = {}
        for s in range(ids.shape[1]):
            e = int(ids[g, s])
            if valid[g, s] or count_padding:
                used[e] = used.get(e, 0) + 1
                kept[g, s] = valid[g, s] and used[e] <= capacity
    return kept


@pytest.mark.parametrize("count_padding", [True, False])
def test_fixed_capacity_keeps_the_first_tokens_of_each_row(count_padding):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 11, 4)) * 3, jnp.float32)
    valid = np.ones((3, 11), bool)
    valid[1, 7:] = False                      # right padding
    valid[2, :2] = False                      # left padding
    r = route(logits, top_k=1, renormalize=False, capacity=2, token_mask=jnp.asarray(valid),
              padding_takes_capacity=count_padding)
    want = _capacity_loop(np.asarray(r.expert_ids[..., 0]), valid, 2, count_padding)
    np.testing.assert_array_equal(np.asarray(r.kept[..., 0]), want)
    assert 0 < want.sum() < valid.sum()       # some tokens dropped, some kept
    probs = np.asarray(r.probs).max(-1)
    np.testing.assert_allclose(np.asarray(r.weights[..., 0]), np.where(want, probs, 0))


def test_switch_block_equals_a_per_token_loop():
    """A Switch layer: kept token -> router prob x expert(x); dropped token -> 0."""
    moe = dataclasses.replace(switch_moe(4, 24, 2, 2, expert_capacity=3), layer_offset=0,
                              every_n=1)
    block = HardMoE(moe, "relu")
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    params = sharding.unbox(block.init(jax.random.key(2), x)["params"])
    y, aux = block.apply({"params": params}, x)
    w = params["experts"]
    probs = jax.nn.softmax(x @ params["router"]["kernel"], -1)
    ids = np.asarray(aux["expert_ids"][..., 0])
    kept = _capacity_loop(ids, np.ones(ids.shape, bool), 3, True)
    want = np.zeros(y.shape, np.float32)
    for g in range(2):
        for s in range(9):
            if kept[g, s]:
                e = ids[g, s]
                h = jax.nn.relu(x[g, s] @ w["w_up"][e]) @ w["w_down"][e]
                want[g, s] = probs[g, s, e] * h
    assert (~kept).any()
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


def test_router_jitter_only_with_a_jitter_rng():
    moe = dataclasses.replace(switch_moe(4, 8, 1, 1, jitter=0.5))
    block = HardMoE(moe, "relu")
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    params = {"params": sharding.unbox(block.init(jax.random.key(1), x)["params"])}
    plain, aux = block.apply(params, x)
    again, _ = block.apply(params, x)
    np.testing.assert_array_equal(plain, again)
    noisy, noisy_aux = block.apply(params, x, rngs={"jitter": jax.random.key(3)})
    assert not np.allclose(aux["probs"], noisy_aux["probs"])
    off = HardMoE(dataclasses.replace(moe, router_jitter=0.0), "relu")
    quiet, _ = off.apply(params, x, rngs={"jitter": jax.random.key(3)})
    np.testing.assert_array_equal(plain, quiet)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny-switch")
    return cfg, init_params(cfg, seed=3)


def _batch():
    lengths = np.array([9, 4, 6])
    tokens = np.random.default_rng(0).integers(3, 250, (3, 9)).astype(np.int32)
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, tokens, 0), mask


def test_cached_decoding_equals_teacher_forcing(tiny):
    cfg, params = tiny
    tokens, mask = _batch()
    gen = Seq2SeqGenerator(cfg)
    out = gen(params, tokens, mask, max_new_tokens=10, stop_tokens=(), return_logits=True)
    dec = np.concatenate([np.full((3, 1), cfg.decoder_start_token_id), out.tokens[:, :-1]], 1)
    logits, aux = build(cfg).apply({"params": params}, tokens, mask, dec)
    np.testing.assert_allclose(out.logits, np.asarray(logits), atol=1e-5)
    assert gen.traces == {"start": 1, "decode": 1}
    assert len(aux["encoder"]) == cfg.encoder_layers and aux["encoder"][1]    # block 1 is MoE


def test_padding_does_not_change_a_row(tiny):
    """Right padding (and the padded rows' neighbours) leave each row's logits unchanged; the
    capacity that padding takes is never reached here (tiny-switch is dropless)."""
    cfg, params = tiny
    tokens, mask = _batch()
    gen = Seq2SeqGenerator(cfg)
    batch = gen(params, tokens, mask, max_new_tokens=6, stop_tokens=(), return_logits=True)
    for b in range(3):
        n = int(mask[b].sum())
        one = gen(params, tokens[b:b + 1, :n], mask[b:b + 1, :n], max_new_tokens=6,
                  stop_tokens=(), return_logits=True)
        np.testing.assert_array_equal(one.tokens[0], batch.tokens[b])
        np.testing.assert_allclose(one.logits[0], batch.logits[b], atol=1e-5)


def test_encdec_config_errors_and_json():
    cfg = get_config("tiny-switch")
    assert EncDecConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="ReLU.*gelu"):
        cfg.replace(activation="gelu").validate()
    with pytest.raises(ValueError, match="decoder_moe must be dense or hard"):
        cfg.replace(decoder_moe=dataclasses.replace(cfg.decoder_moe, kind="soft")).validate()


def test_generate_cli_runs_an_encoder_decoder(capsys):
    import json
    from moex.cli import main
    assert main(["generate", "tiny-switch", "--prompt", "hello", "--prompt", "a b c",
                 "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "a b c"]
    assert all(1 <= len(r["tokens"]) <= 4 for r in rows)
    # through the offload engine (a quarter of the experts on the device): the same tokens
    assert main(["generate", "tiny-switch", "--prompt", "hello", "--prompt", "a b c",
                 "--max-new-tokens", "4", "--offload", "lru", "--expert-budget", "25%"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == rows
    assert json.loads(captured.err.splitlines()[-1])["offload"]["slots"] == 4
    assert main(["generate", "tiny-switch", "--prompt", "x", "--mesh", "data=1"]) == 2
    assert "--mesh is not available for the encoder-decoder" in capsys.readouterr().err
