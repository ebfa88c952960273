"""Checkpoint layouts convert to identical params; bad input fails clearly and leaves no OUT."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoints_convert.convert import convert
from checkpoints_convert.reader import CheckpointError
from moex import checkpoint
from moex.cli import main as moex_main
from tests.hf_models import model_class


def params_of(path):
    return checkpoint.load(path, as_numpy=True)[1]


def assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y), p


def in_memory_layout(src, dst, fmt):
    """The model's in-memory state dict (fused 3-D experts) as safetensors or pytorch_model.bin."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    model = model_class("mixtral").from_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    if fmt == "safetensors":
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_sharded_single_fused_and_bin_give_identical_params(hf_model, converted, tmp_path):
    from tests.hf_models import save
    reference = params_of(converted("mixtral"))
    sharded = save("mixtral", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    outs = [convert(sharded, tmp_path / "o1", "fp32", progress=False),
            convert(in_memory_layout(hf_model("mixtral"), tmp_path / "fused", "safetensors"),
                    tmp_path / "o2", "fp32", progress=False),
            convert(in_memory_layout(hf_model("mixtral"), tmp_path / "bin", "bin"),
                    tmp_path / "o3", "fp32", progress=False)]
    for out in outs:
        assert_same_params(reference, params_of(out))


def rewrite_without(src, dst, drop):
    from safetensors import safe_open
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        kept = {k: h.get_tensor(k) for k in h.keys() if k != drop}
    save_file(kept, str(f), metadata={"format": "pt"})
    return dst


def test_missing_tensor_names_key_and_file(hf_model, tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    src = rewrite_without(hf_model("mixtral"), tmp_path / "src", key)
    with pytest.raises(CheckpointError, match=rf"missing tensor '{key}'.*model\.safetensors"):
        convert(src, tmp_path / "out", "fp32", progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_states_expected_and_found(hf_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight in model\.safetensors.*"
                                              r"implies \(32, 64\).*gives \(32, 48\)"):
        convert(src, tmp_path / "out", "fp32", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_lists_supported(hf_model, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_model("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert moex_main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'GPT2LMHeadModel' is not supported" in err and "MixtralForCausalLM" in err
    assert not (tmp_path / "out").exists()
    # python -m checkpoints_convert is the same command
    done = subprocess.run([sys.executable, "-m", "checkpoints_convert", str(src),
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 2 and "'GPT2LMHeadModel' is not supported" in done.stderr


def test_truncated_safetensors_is_reported(hf_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model("olmoe"), src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        convert(src, tmp_path / "out", "fp32", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_not_overwritten(hf_model, converted):
    with pytest.raises(FileExistsError, match="exists"):
        convert(hf_model("llama"), converted("llama"), "fp32", progress=False)


def test_moex_native_soft_model_cannot_be_exported(tmp_path):
    from checkpoints_convert.export import to_hf
    from moex.model import init_params
    from moex.config import get_config
    cfg = get_config("tiny-soft")
    checkpoint.save(tmp_path / "soft", cfg, init_params(cfg))
    with pytest.raises(CheckpointError, match="soft"):
        to_hf(tmp_path / "soft", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("preset,arch", [("tiny-hard", "MixtralForCausalLM"),
                                         ("tiny-dense", "LlamaForCausalLM")])
def test_moex_native_lm_exports_to_transformers(preset, arch, tmp_path):
    import transformers
    from checkpoints_convert.export import to_hf
    from moex.config import get_config
    from moex.model import build, forward, init_params
    cfg = get_config(preset).replace(vision=None, projector=None)
    params = init_params(cfg, seed=1)
    checkpoint.save(tmp_path / "m", cfg, params)
    out = to_hf(tmp_path / "m", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(forward(build(cfg), params, ids, np.ones_like(ids))[0])
    assert np.abs(ours - ref).max() <= 1e-4


def test_tokenizer_files_travel_and_load(hf_model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    src = tmp_path / "src"
    shutil.copytree(hf_model("llama"), src)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "moe"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    out = convert(src, tmp_path / "out", "fp32", progress=False)
    cfg, params, loaded = checkpoint.load(out)
    assert (out / "tokenizer.json").is_file()
    assert loaded.encode("hello moe world").ids == [3, 5, 4]
    assert cfg.decoder.tie_embeddings                      # the llama test model ties them
