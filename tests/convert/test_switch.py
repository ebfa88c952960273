"""Switch Transformers (HF) -> moex encoder-decoder: logits and greedy tokens against
transformers, token dropping at capacity, the bit-exact round trip, config errors, compare-hf.

The tiny models (tests/hf_models.py): 'switch_drop' (4 experts, capacity 2 per sequence, tied
embeddings: the batches below drop tokens in both stacks) and 'switch' (8 experts in every
encoder block, capacity 64: nothing dropped; untied LM head, decoder start 3).
"""

import json
import shutil
from dataclasses import replace

import jax
import numpy as np
import pytest
import torch

from checkpoints_convert.convert import open_source
from checkpoints_convert.export import to_hf
from checkpoints_convert.reader import CheckpointError
from checkpoints_convert.switch import hf_sparse_blocks, moex_sparse_blocks, to_moex
from moex import checkpoint
from moex.config import get_config
from moex.model import abstract_params, build
from moex.seq2seq import Seq2SeqGenerator
from tests.convert.test_convert import read_all
from tests.hf_models import SWITCH_ARCHS, model_class

LENGTHS = (20, 13, 7)          # encoder rows, right-padded to 20 (beyond max_distance 12)


def batch(cfg, seed=0):
    """Encoder ids and mask (3, 20), teacher-forced decoder ids (3, 10) from the start token."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(LENGTHS), max(LENGTHS)), cfg.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        ids[b, :n], mask[b, :n] = rng.integers(2, cfg.vocab_size, n), 1
    dec = np.concatenate([np.full((len(LENGTHS), 1), cfg.decoder_start_token_id),
                          rng.integers(2, cfg.vocab_size, (len(LENGTHS), 9))], axis=1)
    return ids, mask, dec.astype(np.int32)


def run(cfg, params, ids, mask, dec):
    """moex's teacher-forced forward (jitted: a few times faster here than op by op)."""
    return jax.jit(build(cfg).apply)({"params": params}, ids, mask, dec)


def random_params(cfg, seed):
    """moex params of `cfg` drawn in numpy (no init to compile): N(0, 1/fan_in) matrices,
    N(0, 1) embeddings and relative biases, norm scales near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            x = 1 + 0.1 * rng.standard_normal(s.shape)
        elif name in ("embed", "lm_head") or name.endswith("relative_bias"):
            x = rng.standard_normal(s.shape)
        else:       # q, k, v (D, H, Dh), o (H, Dh, D), kernels (D, F), experts (E, D | F, ...)
            fan_in = s.shape[1] if "experts" in name else \
                s.shape[0] * s.shape[1] if name.endswith("/o") else s.shape[0]
            x = rng.standard_normal(s.shape) / np.sqrt(fan_in)
        return x.astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def torch_ids(*arrays):
    return [torch.from_numpy(a.astype(np.int64)) for a in arrays]


def hf_model_of(path, name):
    model = model_class(name).from_pretrained(path, dtype=torch.float32).eval()
    assert not model.training                      # no router jitter, no dropout
    return model


def real_weights(aux, stack, mask_of_stack):
    """The routing weights of real tokens in every MoE block of a stack."""
    return [np.asarray(a["weights"])[..., 0][mask_of_stack] for a in aux[stack] if a]


@pytest.mark.parametrize("name", SWITCH_ARCHS)
def test_fp32_logits_match_transformers_on_padded_batches(name, hf_model, converted):
    cfg, params, _ = checkpoint.load(converted(name))
    ids, mask, dec = batch(cfg)
    hf = hf_model_of(hf_model(name), name)
    i, m, d = torch_ids(ids, mask, dec)
    with torch.no_grad():
        ref = hf(input_ids=i, attention_mask=m, decoder_input_ids=d).logits.numpy()
    ours, aux = run(cfg, params, ids, mask, dec)
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{name}: max |logit diff| {err:.2e}, max |logit| {np.abs(ref).max():.2f}")
    assert err <= 1e-4
    assert np.abs(ref).max() > 0.5                 # logits are not trivially small

    enc_w = real_weights(aux, "encoder", mask.astype(bool))
    dec_w = real_weights(aux, "decoder", np.ones(dec.shape, bool))
    assert enc_w and dec_w
    if name == "switch_drop":
        # capacity 2 of 4 experts: real tokens past it get weight 0 (a zero FFN output) in both
        # stacks, and transformers drops the same ones (else the logits above would differ) ...
        assert all((w == 0).sum() >= 3 for w in enc_w + dec_w)
        # ... which matters: without the capacity the logits move away from transformers'
        free = cfg.replace(encoder_moe=replace(cfg.encoder_moe, expert_capacity=None),
                           decoder_moe=replace(cfg.decoder_moe, expert_capacity=None))
        dropless = np.asarray(run(free, params, ids, mask, dec)[0])
        assert np.abs(dropless - ref).max() > 1e-2
    else:
        assert all((w > 0).all() for w in enc_w + dec_w)


@pytest.mark.parametrize("name", SWITCH_ARCHS)
def test_greedy_tokens_match_transformers(name, hf_model, converted):
    cfg, params, _ = checkpoint.load(converted(name))
    ids, mask, _ = batch(cfg, seed=1)
    hf = hf_model_of(hf_model(name), name)
    hf.generation_config.eos_token_id = None          # 16 steps on both sides, no stop token
    i, m = torch_ids(ids, mask)
    with torch.no_grad():
        want = hf.generate(input_ids=i, attention_mask=m, max_new_tokens=16,
                           do_sample=False)[:, 1:].numpy()       # after the start token
    got = Seq2SeqGenerator(cfg, params).generate(ids, mask, 16, stop_at_eos=False)
    print(f"{name}: transformers {want.tolist()}\n{name}: moex         {np.asarray(got).tolist()}")
    assert want.shape == (3, 16)
    np.testing.assert_array_equal(got, want)
    # not the degenerate one-token output of a badly initialised tiny model
    assert all(len(set(row)) >= 2 for row in want.tolist()) and len(np.unique(want)) >= 5


@pytest.mark.parametrize("name", SWITCH_ARCHS)
def test_round_trip_is_bit_exact(name, hf_model, converted, tmp_path):
    src = hf_model(name)
    back = to_hf(converted(name), tmp_path / "back")
    a, b = read_all(src), read_all(back)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    before = json.loads((src / "config.json").read_text())
    after = json.loads((back / "config.json").read_text())
    for k in set(before) - {"transformers_version"}:
        assert after.get(k) == before[k], k
    _, info = model_class(name).from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info               # no missing, unexpected or mismatched keys


def test_moex_native_encdec_exports_to_transformers(tmp_path):
    """A moex-native Switch checkpoint (dropless: exported with expert_capacity = max_seq_len)
    loads in transformers and gives the same logits."""
    cfg = get_config("tiny-switch")
    params = random_params(cfg, seed=3)
    back = to_hf(checkpoint.save(tmp_path / "native", cfg, params), tmp_path / "hf")
    hf_cfg = json.loads((back / "config.json").read_text())
    assert hf_cfg["expert_capacity"] == cfg.max_seq_len
    assert hf_cfg["num_sparse_encoder_layers"] == 2 and hf_cfg["decoder_start_token_id"] == 257
    hf = model_class("switch").from_pretrained(back, dtype=torch.float32).eval()
    ids, mask, dec = batch(cfg, seed=2)
    with torch.no_grad():
        ref = hf(*torch_ids(ids, mask), decoder_input_ids=torch_ids(dec)[0]).logits.numpy()
    ours = np.asarray(run(cfg, params, ids, mask, dec)[0])
    err = np.abs(ours - ref).max()
    print(f"tiny-switch (moex-native): max |logit diff| {err:.2e}, max |logit| "
          f"{np.abs(ref).max():.2f}")
    assert err <= 1e-4 and np.abs(ref).max() > 0.5


@pytest.mark.parametrize("field,value,expected", [
    ("dense_act_fn", "gated-gelu", "field 'dense_act_fn' 'gated-gelu' is not supported"),
    ("router_bias", True, "field 'router_bias' true is not supported"),
    ("d_kv", 0, "field 'd_kv' must be an integer >= 1, found 0"),
    ("router_jitter_noise", -0.1, "field 'router_jitter_noise' must be a number >= 0"),
])
def test_unsupported_config_names_the_field(field, value, expected, hf_model, tmp_path):
    src = shutil.copytree(hf_model("switch_drop"), tmp_path / "bad")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        open_source(src)
    assert expected in str(e.value) and "config.json" in str(e.value)


def test_router_dtype_and_untied_stack_embeddings(hf_model, tmp_path):
    """router_dtype bfloat16 is accepted (transformers' own routing precision); stack
    embeddings that differ from `shared` (transformers 5, untied) are refused by name."""
    src = shutil.copytree(hf_model("switch"), tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "router_dtype": "bfloat16"}))
    open_source(src)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(src / "model.safetensors")
    tensors["decoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"] + 1
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    from checkpoints_convert.convert import convert
    with pytest.raises(CheckpointError, match="decoder.embed_tokens.weight differs from "
                                              "shared.weight; moex keeps one array"):
        convert(src, tmp_path / "out", "fp32", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 6])
def test_sparse_blocks_are_the_ones_transformers_builds(layers):
    """num_sparse_*_layers n -> MoE blocks, as transformers builds them (n = 0 still makes block
    1 sparse; n > layers none), and the converted config selects the same blocks."""
    import transformers as T
    tiny = dict(vocab_size=8, d_model=4, d_kv=2, num_heads=1, d_ff=4, num_experts=2)
    for n in range(layers + 2):
        hf_cfg = T.SwitchTransformersConfig(**tiny, num_layers=layers, num_decoder_layers=layers,
                                            num_sparse_encoder_layers=n,
                                            num_sparse_decoder_layers=n)
        model = T.SwitchTransformersEncoderModel(hf_cfg)
        built = tuple(i for i, b in enumerate(model.encoder.block) if b.is_sparse)
        assert hf_sparse_blocks(n, layers) == built, (layers, n)
        ours = to_moex(dict(hf_cfg.to_dict(), architectures=["x"]))
        assert moex_sparse_blocks(ours.encoder_moe, layers) == built, (layers, n)


def test_compare_hf_reports_parity(hf_model, capsys):
    from moex.cli import main
    assert main(["compare-hf", str(hf_model("switch_drop")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "SwitchTransformersForConditionalGeneration"
    assert report["max_abs"] <= 1e-4 and report["max_kl"] < 1e-8
    assert report["greedy_equal"] and len(report["greedy"]["moex"][0]) == 8
    assert len(report["per_position"]) == 8
