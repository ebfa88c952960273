"""Sparse upcycling (moex.upcycle): exact before training, the documented Soft MoE relation,
layer selections, the published upcycled layouts, and the command on a converted LLaVA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex import checkpoint
from moex.cli import main as cli
from moex.config import MoEConfig, get_config
from moex.model import build, init_params
from moex.nn.moe import SoftMoE
from moex.nn.layers import MLP
from moex.upcycle import (UpcycleSpec, layer_selection, like_preset, parse_layers,
                          upcycle_config, upcycle_params)
from tests.helpers import image_prompts, random_images


def logits(cfg, params, ids, mask, images):
    """Logits at the real (non-padding) positions: routed blocks leave padding tokens out."""
    out = np.asarray(build(cfg).apply({"params": params}, ids, mask, images)[0])
    return out[np.asarray(mask) > 0]


@pytest.fixture(scope="module")
def dense():
    cfg = get_config("tiny-dense")
    params = jax.tree.map(np.asarray, init_params(cfg, seed=1))
    ids, mask = image_prompts(cfg, [5, 11], seed=2)
    images = random_images(cfg, 2, seed=3)
    return cfg, params, (ids, mask, images), logits(cfg, params, ids, mask, images)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hard_copies_give_the_dense_logits(dense, k):
    cfg, params, batch, want = dense
    # tiny-dense's vision tower uses block 0 (feature layer -2): upcycle it and the projector too
    dst = upcycle_config(cfg, UpcycleSpec("hard", experts=4, top_k=k, vision_layers="0",
                                          projector=True))
    new = upcycle_params(cfg, params, dst, seed=0)
    kernel = new["decoder"]["layer_0"]["ffn"]["router"]["kernel"]
    assert np.abs(kernel).max() > 0                      # noise breaks the tie ...
    e = new["decoder"]["layer_1"]["ffn"]["experts"]["w_up"]
    assert all(np.array_equal(e[0], e[i]) for i in range(4))   # ... the experts are copies
    np.testing.assert_allclose(logits(dst, new, *batch), want, rtol=1e-5, atol=1e-5)


def test_hard_without_renormalisation_scales_by_the_top_k_mass(dense):
    cfg, params, _, _ = dense
    dst = upcycle_config(cfg, UpcycleSpec("hard", experts=4, top_k=2, renormalize=False))
    new = upcycle_params(cfg, params, dst, seed=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 64)), jnp.float32)
    mlp = MLP(128, "swiglu")
    f = mlp.apply({"params": params["decoder"]["layer_0"]["ffn"]["mlp"]}, x)
    from moex.nn.moe import HardMoE
    y, aux = HardMoE(dst.decoder.moe, "swiglu").apply(
        {"params": new["decoder"]["layer_0"]["ffn"]}, x)
    mass = jnp.sort(aux["probs"], -1)[..., -2:].sum(-1, keepdims=True)
    np.testing.assert_allclose(y, mass * f, rtol=1e-5, atol=1e-6)


def test_soft_decoder_split_with_uniform_gates_gives_the_dense_logits(dense):
    cfg, params, batch, want = dense
    dst = upcycle_config(cfg, UpcycleSpec("soft", experts=4))
    assert dst.decoder.moe.expert_dim == cfg.decoder.ffn_dim // 4
    new = upcycle_params(cfg, params, dst)
    assert not np.any(new["decoder"]["layer_0"]["ffn"]["router"])   # uniform gates
    np.testing.assert_allclose(logits(dst, new, *batch), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="128 is not a multiple of 3"):
        upcycle_config(cfg, UpcycleSpec("soft", experts=3))


def test_vision_soft_moe_is_the_dense_mlp_on_slot_mixtures(dense):
    cfg, params, _, _ = dense
    dst = upcycle_config(cfg, UpcycleSpec("soft", experts=4, layers="none", vision_layers="0",
                                          vision_experts=4, slots=5))
    new = upcycle_params(cfg, params, dst, seed=3)
    block, dense_mlp = new["vision"]["layer_0"]["ffn"], params["vision"]["layer_0"]["ffn"]["mlp"]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 17, 64)), jnp.float32)
    f = lambda z: MLP(128, "gelu", use_bias=True).apply({"params": dense_mlp}, z)
    soft = SoftMoE(dst.vision.moe, "gelu", use_bias=True)
    y, _ = soft.apply({"params": block}, x)
    from moex.nn.moe import soft_moe_weights
    d, c = soft_moe_weights(x, block["slots"], block["scale"])          # (G, M, E, P)
    slot_inputs = jnp.einsum("gmep,gmd->gepd", d, x)
    want = jnp.einsum("gmep,gepd->gmd", c, f(slot_inputs))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # zero slots: every slot is the mean token, every token gets f(mean token)
    y0, _ = soft.apply({"params": {**block, "slots": jnp.zeros_like(block["slots"])}}, x)
    np.testing.assert_allclose(y0, jnp.broadcast_to(f(x.mean(1, keepdims=True)), x.shape),
                               rtol=1e-5, atol=1e-5)


def test_layer_selection_round_trips():
    for n in (1, 4, 7, 24):
        for text in ("all", "none", "even", "odd", f"{n // 2}-{n - 1}:2") + ("0,2,3",) * (n > 3):
            layers = parse_layers(text, n)
            sel = MoEConfig(kind="hard", num_experts=2, expert_dim=1,
                            **layer_selection(layers, n))
            assert tuple(i for i in range(n) if sel.is_moe_layer(i)) == layers, (n, text)
    assert layer_selection(parse_layers("13-23:2", 24), 24) == dict(
        first_k_dense=12, every_n=2, layer_offset=1, dense_layers=())
    with pytest.raises(ValueError, match=r"\[30\] outside the model's 24 blocks"):
        parse_layers("0,30", 24)
    with pytest.raises(ValueError, match="cannot read 'x'"):
        parse_layers("1,x", 24)


def test_llava_7b_upcycles_to_the_published_layouts():
    base = get_config("llava-1.5-7b")
    for preset, spec in (
            ("llava-1.5-7b-hard", UpcycleSpec("hard", experts=4, top_k=2, layers="even")),
            ("llava-1.5-7b-soft", UpcycleSpec("soft", experts=4, layers="even",
                                              vision_layers="13-23:2", vision_experts=64,
                                              slots=9))):
        want, got = get_config(preset), upcycle_config(base, spec)
        for part in ("decoder", "vision", "projector"):
            assert getattr(got, part) == getattr(want, part), (preset, part)
        assert like_preset(base, want).decoder == want.decoder


def test_refuses_what_it_cannot_upcycle(dense):
    cfg, _, _, _ = dense
    with pytest.raises(ValueError, match="already 'hard' MoE"):
        upcycle_config(get_config("tiny-hard"), UpcycleSpec("hard"))
    with pytest.raises(ValueError, match="shapes differ"):
        like_preset(cfg, get_config("llava-1.5-7b-hard"))
    with pytest.raises(ValueError, match="nothing to upcycle"):
        upcycle_config(cfg, UpcycleSpec("hard", layers="none"))


def test_upcycle_command_on_a_converted_llava(converted, tmp_path):
    from tests.convert.test_convert import inputs
    src = converted("llava")
    cfg, params, _ = checkpoint.load(src)
    ids, mask, images, _ = inputs(cfg)
    want = logits(cfg, params, ids, mask, images)
    for to, extra in (("hard", ["--top-k", "2", "--layers", "even", "--vision-layers", "0-1",
                                "--projector"]),
                      ("soft", ["--layers", "odd"])):
        out = tmp_path / to
        assert cli(["upcycle", str(src), str(out), "--to", to, "--experts", "4", *extra]) == 0
        got_cfg, got, _ = checkpoint.load(out)
        assert got_cfg.decoder.moe.kind == to and got_cfg.name.endswith(f"-{to}")
        np.testing.assert_allclose(logits(got_cfg, got, ids, mask, images), want, rtol=2e-5,
                                   atol=2e-5)
        assert (out / "tokenizer.json").exists() == (src / "tokenizer.json").exists()
    # refused before anything is written: a soft-MoE source, an existing OUT
    assert cli(["upcycle", str(tmp_path / "soft"), str(tmp_path / "again"), "--to", "hard"]) == 2
    assert not (tmp_path / "again").exists()
    with pytest.raises(FileExistsError):
        cli(["upcycle", str(src), str(tmp_path / "hard"), "--to", "hard"])
    assert not list(tmp_path.glob(".hard.tmp-*"))
