"""`moex bench quant` on a test-size model (random tiny-hard weights as both the VLM and the LM
run): int4 moves the logits more than int8, accuracy and held-out loss are reported per format,
the files are written, a missing checkpoint names the command that makes it; `mixed` keeps
exactly the most-routed experts at full precision and the rest int4."""

import csv
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.checkpoint import LoadedModel
from moex.cli import main
from moex.config import get_config
from moex.data import SyntheticSpec, write_synthetic
from moex.experiments import quant_quality
from moex.experiments.quant_quality import mixed_keep, variant_params
from moex.model import abstract_params
from moex.offload.store import moe_layers
from moex.predict.lm import LMTrainConfig
from moex.tokenizer import ByteTokenizer


def test_mixed_keep_takes_the_most_routed_experts_per_layer():
    counts = {1: np.array([5, 9, 0, 9]), 3: np.array([0, 0, 0, 1])}
    # floor(0.5 x 4) = 2 per layer; a tie goes to the lower expert id
    assert mixed_keep(counts, 0.5) == {(1, 1), (1, 3), (3, 3), (3, 0)}
    assert mixed_keep(counts, 0.1) == {(1, 1), (3, 3)}          # at least one
    assert len(mixed_keep(counts, 1.0)) == 8


@functools.lru_cache(maxsize=None)
def tiny_hard():
    """(cfg, params) of tiny-hard with random normal weights: from the shapes, without
    compiling the initialiser (~7 s here)."""
    cfg = get_config("tiny-hard")
    rng = np.random.default_rng(0)
    return cfg, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                             abstract_params(cfg))


def test_mixed_params_keep_exactly_the_chosen_experts_at_full_precision():
    cfg, params = tiny_hard()
    layers, e = moe_layers(cfg), cfg.decoder.moe.num_experts
    keep = mixed_keep({i: np.arange(e)[::-1] * (i + 1) for i in layers}, 0.5)   # the lower half
    mixed = variant_params(cfg, params, "mixed", keep)
    int4 = variant_params(cfg, params, "int4", keep)
    for i in layers:
        for w, full in params["decoder"][f"layer_{i}"]["ffn"]["experts"].items():
            got = np.asarray(mixed["decoder"][f"layer_{i}"]["ffn"]["experts"][w])
            low = np.asarray(int4["decoder"][f"layer_{i}"]["ffn"]["experts"][w])
            for x in range(e):
                if (i, x) in keep:
                    np.testing.assert_array_equal(got[x], np.asarray(full[x]))
                else:
                    np.testing.assert_array_equal(got[x], low[x])
                    assert not np.array_equal(got[x], np.asarray(full[x]))
    assert keep == {(i, x) for i in layers for x in range(e // 2)}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A tiny-hard model (random weights, byte tokenizer, a vision tower) as both the VLM
    checkpoint and the LM run's model, and a small synthetic dev split. The checkpoint folder
    holds only config.json: loading it is `moex.checkpoint`'s (tested there), so the loader
    returns the in-memory params (an orbax save costs ~10 s here)."""
    cfg, params = tiny_hard()
    lm = tmp_path / "lm"
    (lm / "model").mkdir(parents=True)
    (lm / "model" / "config.json").write_text(cfg.to_json())
    lm_run = LMTrainConfig(preset="tiny-hard", seq_len=16, eval_windows=2)
    (lm / "run.json").write_text(json.dumps(dataclasses.asdict(lm_run)))
    monkeypatch.setattr(quant_quality, "load_model",
                        lambda path: LoadedModel(cfg, params, ByteTokenizer(), str(path), path))
    data = tmp_path / "data"
    write_synthetic(data, SyntheticSpec(n_train=0, n_dev=6))
    return lm / "model", lm, data


def test_bench_quant_end_to_end(tmp_path, runs, capsys):
    vlm, lm, data = runs
    out = tmp_path / "out"
    assert main(["bench", "quant", "--vlm", str(vlm), "--lm", str(lm), "--data", str(data),
                 "--questions", "4", "--eval-batch", "4", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    by = {(r["kind"], r["format"]): r for r in rows}
    assert set(by) == {(k, f) for k in ("vlm", "lm") for f in ("full", "int8", "int4", "mixed")}
    for kind in ("vlm", "lm"):
        full, q8, q4 = (by[(kind, f)] for f in ("full", "int8", "int4"))
        assert float(full["logit_max_abs"]) == 0 and float(full["top1_agreement"]) == 1
        for stat in ("logit_max_abs", "logit_mean_abs"):
            assert 0 < float(q8[stat]) < float(q4[stat]), (kind, stat)
        for f in ("int8", "int4", "mixed"):
            assert 0 <= float(by[(kind, f)]["top1_agreement"]) <= 1
            assert float(by[(kind, f)]["expert_mb"]) < float(full["expert_mb"])
    for f in ("full", "int8", "int4", "mixed"):
        r = by[("vlm", f)]
        assert all(0 <= float(r[k]) <= 1 for k in ("mmbench_circular", "mmbench_plain",
                                                    "seed_likelihood"))
        assert int(r["mmbench_questions"]) == 4
        assert np.isfinite(float(by[("lm", f)]["heldout_mean"]))
        assert float(r["drop_mmbench_plain"]) == pytest.approx(
            100 * (float(by[("vlm", "full")]["mmbench_plain"]) - float(r["mmbench_plain"])))
    # mixed keeps floor(0.25 x E) (at least 1) experts per layer: the most-routed ones
    kept = json.loads((out / "results.json").read_text())["config"]["mixed_full_precision"]
    e = tiny_hard()[0].decoder.moe.num_experts
    for kind in ("vlm", "lm"):
        assert int(by[(kind, "mixed")]["experts_full"]) == len(kept[kind]) * max(1, e // 4)
        for layer in kept[kind].values():
            c = np.asarray(layer["routing_counts"])
            assert min(c[layer["full_precision"]]) >= max(np.delete(c, layer["full_precision"]))
    assert "| format | experts full |" in (out / "report.md").read_text()
    assert "| mixed |" in capsys.readouterr().out


def test_missing_checkpoint_names_the_command(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["bench", "quant", "--vlm", "", "--lm", str(tmp_path / "none"),
                 "--out", out]) == 2
    assert "moex lm train small-hard" in capsys.readouterr().err
    assert main(["bench", "quant", "--vlm", str(tmp_path / "none"), "--lm", "", "--out", out]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "none") in err and "experiments/vlm_efficiency.py" in err
