"""Routing traces: recorded from a forward, saved and loaded, checked against the model."""

import dataclasses

import numpy as np
import pytest

from moex.model import forward
from moex.offload.trace import Trace, TraceRecorder
from moex.tokenizer import ByteTokenizer
from tests.helpers import tiny


def record(tmp_path):
    cfg, model, params = tiny("tiny-hard")
    ids, mask = ByteTokenizer().batch(["hello world", "hi"])
    _, _, aux = forward(model, params, ids, mask)
    rec = TraceRecorder(cfg)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    rec.add(aux, mask, [7, 8], positions, phase=0)
    return cfg, aux, ids, mask, rec.trace().save(tmp_path / "t.npz")


def test_round_trip_and_contents(tmp_path):
    cfg, aux, ids, mask, path = record(tmp_path)
    t = Trace.load(path)
    n = int(mask.sum())
    assert len(t) == n and t.moe_layers == [0, 1] and t.num_experts == 4 and t.top_k == 2
    assert t.experts.shape == (n, 2, 2) and t.probs.shape == (n, 2, 4)
    assert t.request.tolist() == [7] * int(mask[0].sum()) + [8] * int(mask[1].sum())
    assert t.position[:3].tolist() == [0, 1, 2] and (t.phase == 0).all()
    assert (t.forward == 0).all() and t.pregate is None      # one forward, no pre-gate
    want = np.asarray(aux["decoder"][1]["expert_ids"])[np.asarray(mask, bool)]
    np.testing.assert_array_equal(t.experts[:, 1], want)
    np.testing.assert_allclose(t.probs.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    t.check_model(cfg)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mismatched_model_and_bad_files_are_named(tmp_path):
    cfg, _, _, _, path = record(tmp_path)
    t = Trace.load(path)
    other = cfg.replace(decoder=dataclasses.replace(
        cfg.decoder, moe=dataclasses.replace(cfg.decoder.moe, num_experts=8)))
    with pytest.raises(ValueError, match=r"expected MoE layers \[0, 1\], 8 experts.*4 experts"):
        t.check_model(other)
    np.savez(tmp_path / "bad.npz", request=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz: trace file lacks \['experts'"):
        Trace.load(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable trace file"):
        Trace.load(tmp_path / "junk.npz")
