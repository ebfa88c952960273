"""Qwen3-VL and Qwen3-VL-MoE: logit parity with transformers on images of several sizes (square,
non-square), a batch mixing rows with and without an image, a text-only batch, greedy
generation; both fused expert layouts and the per-expert one; the offload engine; compare-hf
(whose image goes through moex's Qwen preprocessing into both models)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from checkpoints_convert.convert import convert
from moex import checkpoint
from moex.data.qwen_images import QwenImageSpec, hf_pixel_values
from moex.generate import Generator
from moex.model import build, forward
from moex.tokenizer import left_pad
from tests.hf_models import QWEN3_VL, model_class

START, END = 98, 99          # <|vision_start|>, <|vision_end|> of tests.hf_models.QWEN3_IDS


def spec_of(cfg) -> QwenImageSpec:
    v = cfg.vision
    return QwenImageSpec(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch,
                         merge_size=v.spatial_merge, min_pixels=64, max_pixels=1024)


def batch(cfg, size, with_image=(True, True), seed=0):
    """Two left-padded rows (7 and 12 text tokens), each with or without one (H, W) image
    between <|vision_start|> and <|vision_end|>. Returns moex inputs and transformers' extras."""
    rng = np.random.default_rng(seed)
    h, w = size
    n = cfg.vision.tokens_for(h, w)
    images = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    rows = []
    for k, has in zip((7, 12), with_image):
        text = rng.integers(3, 90, k).tolist()
        rows.append(text[:2] + ([START] + [cfg.image_token_id] * n + [END] if has else [])
                    + text[2:])
    ids, mask = left_pad(rows, 0)
    extra = {"mm_token_type_ids": torch.from_numpy((ids == cfg.image_token_id).astype(np.int64))}
    used = [i for i, has in enumerate(with_image) if has]
    if used:
        p = cfg.vision.patch_size
        extra["pixel_values"] = torch.from_numpy(np.concatenate(
            [hf_pixel_values(images[i], spec_of(cfg)) for i in used]))
        extra["image_grid_thw"] = torch.tensor([[1, h // p, w // p]] * len(used))
    return ids, mask, (jnp.asarray(images) if used else None), extra


def load_hf(folder):
    """transformers' model in fp32 with its reference (eager) expert loop: the grouped-matmul
    kernel needs 16-byte-aligned widths, which the odd test sizes are not."""
    return model_class("qwen3_vl").from_pretrained(folder, dtype=torch.float32,
                                                   experts_implementation="eager").eval()


def hf_forward(model, ids, mask, extra):
    kw = dict(extra)
    if "image_grid_thw" not in kw:       # text only: positions as moex counts them
        kw = {"position_ids": torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))}
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(mask.astype(np.int64)), **kw).logits.numpy()


@pytest.mark.parametrize("name", QWEN3_VL)
def test_logits_and_greedy_match_transformers(name, hf_model, converted):
    cfg, params, _ = checkpoint.load(converted(name))
    assert cfg.vision.deepstack_layers == (0, 2) and cfg.decoder.mrope_section == (2, 2, 2)
    hf = load_hf(hf_model(name))
    model = build(cfg)
    mixed = (16, 16) if name == "qwen3_vl" else (32, 8)      # square for one, tall for the other
    cases = {"non-square 16x24": ((16, 24), (True, True)),
             f"{mixed[0]}x{mixed[1]}, one row without": (mixed, (False, True)),
             "text only": ((16, 16), (False, False))}
    if name == "qwen3_vl_moe":
        del cases["text only"]           # the plain decoder path, as for the dense model
    for what, (size, with_image) in cases.items():
        ids, mask, images, extra = batch(cfg, size, with_image)
        ref = hf_forward(hf, ids, mask, extra)
        ours = np.asarray(forward(model, params, ids, mask, images)[0])
        valid = mask.astype(bool)
        err = np.abs(ours - ref)[valid].max()
        print(f"{name} {what}: max abs logit difference {err:.2e}")
        assert err <= 1e-4, what
        assert np.abs(ref[valid]).max() > 0.5

    # Greedy 16 tokens after a prompt with a non-square image (its MRoPE extent is the larger
    # side, so the decoded positions differ from a plain count).
    ids, mask, images, extra = batch(cfg, (16, 24), (True, True), seed=1)
    row = ids[1:]
    n = extra["pixel_values"].shape[0] // 2
    kw = {"pixel_values": extra["pixel_values"][n:], "image_grid_thw": extra["image_grid_thw"][1:],
          "mm_token_type_ids": extra["mm_token_type_ids"][1:]}
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(input_ids=torch.from_numpy(row.astype(np.int64)),
                           attention_mask=torch.ones(row.shape, dtype=torch.long),
                           max_new_tokens=16, do_sample=False, pad_token_id=0,
                           **kw)[0, row.shape[1]:].numpy()
    got = Generator(model)(params, row, np.ones_like(row), images[1:], max_new_tokens=16,
                           stop_tokens=())
    np.testing.assert_array_equal(got.tokens[0], want)


def test_expert_layouts_convert_to_the_same_params(hf_model, converted, tmp_path):
    """Qwen3-VL-MoE's fused experts as transformers saves them (E, 2F, D) / (E, D, F), as the
    published checkpoints hold them (E, D, 2F) / (E, F, D), and per expert, sharded: one set of
    params; each exports back to its own layout bit-exactly."""
    from checkpoints_convert.export import to_hf
    src = hf_model("qwen3_vl_moe")
    tensors = load_file(str(src / "model.safetensors"))
    hub, per_expert = {}, {}
    for k, t in tensors.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            hub[k] = np.ascontiguousarray(t.transpose(0, 2, 1))
            base = k.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if k.endswith("gate_up_proj"):
                    f = t.shape[1] // 2
                    per_expert[f"{base}.{e}.gate_proj.weight"] = t[e, :f]
                    per_expert[f"{base}.{e}.up_proj.weight"] = t[e, f:]
                else:
                    per_expert[f"{base}.{e}.down_proj.weight"] = t[e]
        else:
            hub[k] = per_expert[k] = t
    folders = {}
    for layout, ts in (("hub", hub), ("per-expert", per_expert)):
        folder = folders[layout] = tmp_path / layout
        folder.mkdir()
        shutil.copy(src / "config.json", folder / "config.json")
        keys = sorted(ts)
        halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
        index = {}
        for i, part in enumerate(halves):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: ts[k] for k in part}, str(folder / fname))
            index.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    want = checkpoint.load(converted("qwen3_vl_moe"), as_numpy=True)[1]
    import jax
    for layout, folder in folders.items():
        out = convert(folder, tmp_path / f"moex-{layout}", "fp32", progress=False)
        got = checkpoint.load(out, as_numpy=True)[1]
        for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(want),
                                  jax.tree_util.tree_leaves_with_path(got)):
            assert np.array_equal(a, b), (layout, p)
    back = to_hf(tmp_path / "moex-hub", tmp_path / "back-hub")
    again = load_file(str(back / "model.safetensors"))
    assert set(again) == set(hub) and all(np.array_equal(again[k], hub[k]) for k in hub)
    load_hf(back)                                               # transformers loads it


def test_offload_engine_is_bitwise_exact_on_converted_qwen3_vl_moe(converted):
    """The converted Qwen3-VL-MoE through the offload engine, a non-square image in one row:
    every policy and budget gives all-resident's tokens and logits bit for bit (MRoPE positions
    and DeepStack injections included), and all-resident agrees with the model's forward."""
    from moex.offload.engine import OffloadEngine
    from moex.offload.store import ExpertStore
    cfg, params, _ = checkpoint.load(converted("qwen3_vl_moe"))
    ids, mask, images, _ = batch(cfg, (16, 24), (True, False), seed=2)
    expert = ExpertStore.from_params(cfg, params).expert_bytes
    total = 2 * cfg.decoder.moe.num_experts                  # MoE layers 0 and 2
    ref = OffloadEngine(cfg, params, "all-resident", total * expert)
    first, _ = ref.forward(ids, mask, images=images)
    model = np.asarray(forward(build(cfg), params, ids, mask, images)[0])
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(first)[valid], model[valid], atol=1e-5)
    want = ref.generate(ids, mask, images, max_new_tokens=3, stop_tokens=(), return_logits=True)
    for policy, slots in (("lru", 3), ("pregated", 4)):
        eng = OffloadEngine(cfg, params, policy, slots * expert)
        got = eng.generate(ids, mask, images, max_new_tokens=3, stop_tokens=(),
                           return_logits=True)
        np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=policy)
        np.testing.assert_array_equal(got.logits, want.logits, err_msg=policy)
        assert eng.core.stats.misses > 0, policy


def test_compare_hf_runs_images_through_both(hf_model, capsys):
    from moex.cli import main
    assert main(["compare-hf", str(hf_model("qwen3_vl_moe")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs"] <= 1e-4 and report["greedy_agreement"] == 1.0
    assert len(report["per_position"]) > 12          # the longest prompt + the image tokens
