"""`moex generate PRESET_OR_CHECKPOINT`: a converted transformers Mixtral generates, from text
prompts in its own tokenizer, the greedy tokens of transformers' `generate`, resident and
offloaded; a VLM checkpoint takes --image files; predictive:DIR means the trained predictor."""

import json
import shutil

import numpy as np
import pytest

from moex.cli import main
from moex.tokenizer import word_tokenizer

PROMPTS = ["w5 w17 w40 w41 w9", "w60 w7"]          # left-padded in a batch of two
NEW = 6


@pytest.fixture(scope="module")
def mixtral(hf_model, tmp_path_factory):
    """(HF folder with a word-level tokenizer.json, its moex conversion)."""
    from checkpoints_convert.convert import convert
    root = tmp_path_factory.mktemp("mixtral-gen")
    hf = shutil.copytree(hf_model("mixtral"), root / "hf")
    # ids: <pad> 0, <s> 1, </s> 2 (the HF config's pad / bos / eos), then 91 words: vocab 96
    word_tokenizer([" ".join(f"w{i}" for i in range(5, 96))]).save(str(hf / "tokenizer.json"))
    return hf, convert(hf, root / "moex", "fp32", progress=False)


def transformers_greedy(hf_dir) -> list[list[int]]:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    rows = [[1] + tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         eos_token_id=2, pad_token_id=0)[:, width:].tolist()
    return [r[:r.index(2) + 1] if 2 in r else r for r in out]      # up to and with </s>


def generated(capsys) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()]


def test_converted_mixtral_generates_what_transformers_generates(mixtral, capsys):
    hf, ckpt = mixtral
    want = transformers_greedy(hf)
    args = ["generate", str(ckpt), *[a for p in PROMPTS for a in ("--prompt", p)],
            "--max-new-tokens", str(NEW)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["tokens"] for line in out] == want
    assert json.loads(out[0])["completion"].split()[0].startswith("w")   # decoded words
    for policy, budget in (("lru", "50%"), ("pregated", "25%"), ("predictive:oracle", "50%")):
        assert main(args + ["--offload", policy, "--expert-budget", budget]) == 0
        captured = capsys.readouterr()
        assert [json.loads(line)["tokens"] for line in captured.out.splitlines()] == want
        stats = json.loads(captured.err.strip().splitlines()[-1])["offload"]
        assert stats["slots"] < stats["total_expert_bytes"] // stats["expert_bytes"]


def test_unknown_model_and_unreadable_image_give_clear_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "neither a moex checkpoint folder" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["generate", "tiny-dense", "--prompt", "<image> x", "--image",
                 str(tmp_path / "bad.png")]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["generate", "tiny-dense", "--prompt", "x", "--image",
                 str(tmp_path / "bad.png")]) == 2
    assert "no prompt has <image>" in capsys.readouterr().err


def test_vlm_checkpoint_reads_image_files(tmp_path, capsys):
    """--image files become the preprocessed images of the prompts holding <image>, in order;
    the same pictures give the same answers offloaded; a missing file is named."""
    from moex.cli.model import prompt_images
    from moex.data.images import preprocess
    from PIL import Image
    from moex import checkpoint
    from moex.config import get_config
    from moex.data.vocab import synthetic_tokenizer, write_tokenizer
    from moex.model import init_params
    write_tokenizer(synthetic_tokenizer(), tmp_path)
    ckpt = checkpoint.save(tmp_path / "model", get_config("mini-hard"), init_params("mini-hard"),
                           copy_from=tmp_path)
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(files[-1])
    base = ["generate", str(ckpt), "--prompt", "<image> what color is the shape ?",
            "--prompt", "<image> how many shapes ?", "--max-new-tokens", "3"]
    assert main(base + ["--image", str(files[0]), "--image", str(files[1]),
                        "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert main(base + ["--image", str(files[0]), "--image", str(files[1]), "--offload", "lru",
                        "--expert-budget", "50%"]) == 0
    assert capsys.readouterr().out == first
    assert main(base + ["--image", str(files[0])]) == 2
    assert "give one per such prompt" in capsys.readouterr().err
    v = get_config("mini-hard").vision
    images = prompt_images(get_config("mini-hard"), ["a", "<image> b", "<image> c"],
                           [str(files[1]), str(files[0])], "crop", 0)
    assert not images[0].any()
    for row, f in ((1, files[1]), (2, files[0])):
        np.testing.assert_array_equal(images[row], preprocess(Image.open(f), v.image_size,
                                                              v.image_mean, v.image_std))


def test_qwen3_vl_images_take_the_models_own_resolution(tmp_path, capsys):
    """A dynamic-resolution tower (a converted Qwen3-VL): each --image goes through the model's
    processor at its own size (the checkpoint's preprocessor_config.json), the prompt gets that
    size's number of image tokens; images of one batch must share a size."""
    from PIL import Image
    from checkpoints_convert.convert import convert
    from moex.checkpoint import load_model
    from moex.cli.model import native_images
    from moex.data.qwen_images import QwenImageSpec, preprocess as qwen_preprocess
    hf = tmp_path / "hf"
    assert main(["make-tiny-hf", "qwen3-vl", str(hf), "--size", "test"]) == 0
    ckpt = convert(hf, tmp_path / "ckpt", progress=False)
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(((30, 70), (64, 64))):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(files[-1])
    cfg = load_model(ckpt).cfg
    spec = QwenImageSpec.from_checkpoint(ckpt)
    want = qwen_preprocess(Image.open(files[0]), spec)[0]
    images = native_images(cfg, [False, True], [str(files[0])], ckpt)
    assert images.shape == (2,) + want.shape and want.shape[:2] != (cfg.vision.image_size,) * 2
    np.testing.assert_array_equal(images[1], want)
    assert not images[0].any()
    base = ["generate", str(ckpt), "--prompt", "<image> what color is the shape ?",
            "--max-new-tokens", "2"]
    capsys.readouterr()
    assert main(base + ["--image", str(files[0])]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 2
    assert main(base + ["--prompt", "<image> how many ?", "--image", str(files[0]),
                        "--image", str(files[1])]) == 2
    assert "must share a size after preprocessing" in capsys.readouterr().err
