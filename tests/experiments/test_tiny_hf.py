"""`moex make-tiny-hf`: a tiny random transformers Qwen3-VL dense / MoE pair in the synthetic
benchmark's vocabulary, converted by checkpoints_convert; the pair shares its vision tower, the
converted checkpoints' tokenizer fits and encodes the benchmark's questions without <unk>, and
the MoE answers questions with their images through the offload engine (what `moex bench
offload --checkpoint` feeds it by default)."""

import json

import numpy as np
from safetensors.numpy import load_file

from checkpoints_convert.convert import convert
from moex.checkpoint import load_model
from moex.cli import main
from moex.data import SyntheticSpec, read_mmbench, write_synthetic
from moex.experiments.offload_grid import OffloadBenchConfig, domain_of
from moex.predict.vlm import vlm_prompts
from moex.tokenizer import UNK_ID


def test_tiny_pair_converts_and_answers_with_images(tmp_path):
    hf = {arch: tmp_path / "hf" / arch for arch in ("qwen3-vl", "qwen3-vl-moe")}
    for arch, folder in hf.items():
        assert main(["make-tiny-hf", arch, str(folder), "--size", "test"]) == 0
    assert main(["make-tiny-hf", "qwen3-vl", str(hf["qwen3-vl"]), "--size", "test"]) == 2
    hf_cfg = json.loads((hf["qwen3-vl-moe"] / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    dense, moe = (load_file(folder / "model.safetensors") for folder in hf.values())
    tower = [k for k in dense if ".visual." in k]
    assert tower and all(np.array_equal(dense[k], moe[k]) for k in tower)   # one pair

    ckpt = {arch: convert(folder, tmp_path / "ckpt" / arch, progress=False)
            for arch, folder in hf.items()}
    m = load_model(ckpt["qwen3-vl-moe"])
    cfg, tok = m.cfg, m.tokenizer
    assert (cfg.image_token_id, cfg.pad_token_id, cfg.eos_token_id) == (4, 0, 2)
    assert tok.num_tokens <= cfg.decoder.vocab_size and cfg.decoder.moe.kind == "hard"
    assert cfg.vision.dynamic and cfg.decoder.mrope_section == (2, 3, 3)
    assert (ckpt["qwen3-vl-moe"] / "preprocessor_config.json").is_file()
    assert load_model(ckpt["qwen3-vl"]).cfg.decoder.moe.kind == "dense"

    grid = OffloadBenchConfig(checkpoint=str(ckpt["qwen3-vl-moe"]))
    assert domain_of(grid, m) == "vlm"           # bench offload's default for a VLM checkpoint
    data = write_synthetic(tmp_path / "data", SyntheticSpec(n_train=0, n_dev=2))
    ids, mask, images = vlm_prompts(cfg, tok, read_mmbench(data["mmbench/dev"]))
    assert not (ids == UNK_ID).any()
    assert ((ids == 4).sum(1) == cfg.vision.num_image_tokens).all()
    assert images.shape[1:3] == (cfg.vision.image_size,) * 2   # the engine's run on a converted
    # Qwen3-VL-MoE with images: tests/convert/test_qwen3_vl.py
