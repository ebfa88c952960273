"""Presets, config serialisation, and `moex info` against published totals."""

import json

import pytest

from moex.cli import main
from moex.config import PRESETS, VLMConfig, get_config
from moex.info import format_info, model_info

PUBLISHED = {"mixtral-8x7b": 46.7e9, "qwen1.5-moe-a2.7b": 14.3e9, "deepseek-moe-16b": 16.4e9,
             "llava-1.5-7b": 7.06e9, "qwen3-vl-8b": 8.77e9, "qwen3-vl-30b-a3b": 31.07e9}


@pytest.mark.parametrize("name,total", sorted(PUBLISHED.items()))
def test_info_totals_match_published(name, total):
    assert model_info(name).total_params == pytest.approx(total, rel=0.02)


def test_active_params_published_and_matched_across_small_presets():
    assert model_info("mixtral-8x7b").active_params_per_token == pytest.approx(12.9e9, rel=0.02)
    assert model_info("qwen1.5-moe-a2.7b").active_params_per_token == pytest.approx(2.7e9, rel=0.02)
    assert model_info("deepseek-moe-16b").active_params_per_token == pytest.approx(2.8e9, rel=0.03)
    assert model_info("qwen3-vl-30b-a3b").active_params_per_token == pytest.approx(3.3e9, rel=0.02)
    for family in ("tiny", "small"):
        infos = [model_info(f"{family}-{k}") for k in ("dense", "hard", "soft")]
        base = infos[0]
        for i in infos[1:]:
            assert i.active_params_per_token == pytest.approx(base.active_params_per_token, rel=0.01)
            assert i.vision_active_params_per_token == pytest.approx(
                base.vision_active_params_per_token, rel=0.02)
            assert i.total_params > base.total_params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips_json(name):
    cfg = get_config(name)
    assert VLMConfig.from_json(cfg.to_json()) == cfg


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="tiny-dense"):
        get_config("no-such-model")


def test_config_errors_name_the_field():
    cfg = get_config("tiny-dense")
    bad = json.loads(cfg.to_json())
    bad["decoder"]["hidden"] = 3
    with pytest.raises(ValueError, match="unknown keys.*hidden"):
        VLMConfig.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cfg.replace(decoder=cfg.decoder.__class__(num_heads=4, num_kv_heads=3)).validate()


def test_config_json_of_older_moex_loads():
    """config.json written before the compute vocabulary says compute "ragged": today "auto"."""
    cfg = get_config("tiny-hard")
    old = json.loads(cfg.to_json())
    for part in ("decoder", "vision"):
        old[part]["moe"]["compute"] = "ragged"
    assert VLMConfig.from_json(json.dumps(old)) == cfg
    assert cfg.decoder.moe.compute == "auto"
    old["decoder"]["moe"]["compute"] = "scatter"
    with pytest.raises(ValueError, match=r"decoder.moe: compute must be one of \('auto', "
                                         r"'sorted', 'gather', 'broadcast', 'dense'\)"):
        VLMConfig.from_json(json.dumps(old))


def test_moe_layer_selection():
    qwen = get_config("qwen1.5-moe-a2.7b").decoder.moe
    assert all(qwen.is_moe_layer(i) for i in range(24))
    ds = get_config("deepseek-moe-16b").decoder.moe
    assert not ds.is_moe_layer(0) and ds.is_moe_layer(1)
    phi = get_config("moe-llava-phi2-4e").decoder.moe
    assert [i for i in range(6) if phi.is_moe_layer(i)] == [0, 2, 4]


def test_info_cli_json(capsys):
    assert main(["info", "mixtral-8x7b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == model_info("mixtral-8x7b").total_params
    assert out["bytes_bf16"] == 2 * out["total_params"]
    assert out["kv_bytes_per_token_bf16"] == 2 * 32 * 8 * 128 * 2
    assert main(["info", "nope"]) == 2


@pytest.mark.parametrize("name", ["qwen3-vl-8b", "qwen3-vl-30b-a3b"])
def test_qwen3_vl_presets_are_what_the_converter_reads_from_the_published_config(name):
    """The published config.json (REFERENCES.md's shapes, every other field transformers'
    default) through checkpoints_convert gives the preset's model, up to name and dtype."""
    import transformers as T
    from checkpoints_convert.archs import ARCHITECTURES
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
            "mrope_interleaved": True}
    text = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_parameters=rope,
                max_position_embeddings=262144)
    if name == "qwen3-vl-8b":
        hf = T.Qwen3VLConfig(text_config=dict(text, hidden_size=4096, intermediate_size=12288,
                                              num_hidden_layers=36, num_attention_heads=32,
                                              num_key_value_heads=8),
                             vision_config=dict(vision, out_hidden_size=4096))
        arch = "Qwen3VLForConditionalGeneration"
    else:
        hf = T.Qwen3VLMoeConfig(text_config=dict(text, hidden_size=2048, intermediate_size=6144,
                                                 num_hidden_layers=48, num_attention_heads=32,
                                                 num_key_value_heads=4, num_experts=128,
                                                 num_experts_per_tok=8, moe_intermediate_size=768),
                                vision_config=dict(vision, out_hidden_size=2048))
        arch = "Qwen3VLMoeForConditionalGeneration"
    got = ARCHITECTURES[arch].to_moex(dict(hf.to_dict(), architectures=[arch]))
    want = get_config(name)
    import dataclasses
    same_heads = lambda d: dataclasses.replace(d, head_dim=d.dim_per_head)  # None == d / heads
    assert same_heads(got.decoder) == same_heads(want.decoder) and got.vision == want.vision
    assert got.projector == want.projector and got.image_token_id == want.image_token_id


@pytest.mark.parametrize("name,published", [("switch-base-32", 1.98e9), ("switch-base-64", 3.79e9),
                                            ("switch-base-128", 7.41e9)])
def test_switch_presets_match_published_sizes(name, published):
    """REFERENCES.md: Switch-base-32 / 64 / 128 have 1.98B / 3.79B / 7.41B parameters."""
    info = model_info(name)
    assert info.total_params == pytest.approx(published, rel=0.02)
    assert info.encoder_params + info.decoder_params == info.total_params
    e = int(name.rsplit("-", 1)[1])
    # 6 + 6 Switch blocks of E experts, each expert wi (768 x 3072) + wo (3072 x 768)
    assert info.routed_expert_params == 12 * e * 2 * 768 * 3072
    assert "encoder" in format_info(info)
