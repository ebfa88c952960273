"""The offload engine on an encoder-decoder converted from transformers' Switch Transformers:
bitwise the same logits under every policy and budget, the encoder's routing recorded before any
decoder step, traces in the file format, the replay simulator agreeing with the live counts."""

import numpy as np
import pytest

from checkpoints_convert.convert import convert
from moex import checkpoint
from moex.offload.cache import stream_from_trace
from moex.offload.seq2seq_engine import Seq2SeqOffloadEngine, seq2seq_reference_run
from moex.offload.simulator import simulate_stream
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace
from moex.seq2seq import Seq2SeqGenerator
from tests.hf_models import save

NEW = 6


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    """The converted tiny 'switch' model (8 experts in all 4 encoder blocks and in decoder
    block 1 of 3: MoE layers 0-3 and 4 + 1), its store and a right-padded batch."""
    root = tmp_path_factory.mktemp("switch")
    out = convert(save("switch", root / "hf"), root / "moex", progress=False)
    cfg, params, _ = checkpoint.load(out)
    rng = np.random.default_rng(0)
    lengths = np.array([11, 5, 8])
    ids = rng.integers(2, cfg.vocab_size, (3, 11)).astype(np.int32)
    mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, cfg.pad_token_id)
    return cfg, params, ExpertStore.from_params(cfg, params), ids, mask


def generate(cfg, store, policy, slots, ids, mask, **kw):
    eng = Seq2SeqOffloadEngine(cfg, None, policy, slots * store.expert_bytes, store=store, **kw)
    return eng, eng.generate(ids, mask, max_new_tokens=NEW, stop_tokens=(), return_logits=True)


def test_every_policy_and_budget_is_bitwise_all_resident(switch):
    cfg, params, store, ids, mask = switch
    assert store.layers == [0, 1, 2, 3, 5]       # encoder blocks 0-3, decoder block 1 (4 + 1)
    plain = Seq2SeqGenerator(cfg)(params, ids, mask, max_new_tokens=NEW, stop_tokens=(),
                                  return_logits=True)
    full = len(store.host)
    _, base = generate(cfg, store, "all-resident", full, ids, mask)
    np.testing.assert_array_equal(base.tokens, plain.tokens)
    np.testing.assert_allclose(base.logits, plain.logits, atol=1e-5)
    for policy, slots in [("on-demand", 1), ("lru", 5), ("lru", 11), ("lfu", 6),
                          ("pregated", 2), ("pregated", 7)]:
        eng, out = generate(cfg, store, policy, slots, ids, mask)
        np.testing.assert_array_equal(out.logits, base.logits)
        np.testing.assert_array_equal(out.tokens, base.tokens)
        s = eng.core.stats
        assert s.misses > 0 and eng.pool.num_slots == slots
        if slots == 1:
            assert s.extra_rounds > 0                 # a layer's experts streamed in rounds


def test_encoder_routing_is_recorded_before_decoding_and_round_trips(switch, tmp_path):
    cfg, params, store, ids, mask = switch
    eng = seq2seq_reference_run(cfg, store, ids, mask, new_tokens=NEW)
    trace = eng.trace()
    enc_rows = trace.phase == 0
    assert enc_rows.sum() == mask.sum() and (~enc_rows).sum() == 3 * NEW
    assert trace.forward[enc_rows].max() < trace.forward[~enc_rows].min()  # encoder pass first
    assert trace.encoder_layers == cfg.encoder_layers
    ran = trace.layer_mask()
    assert ran[enc_rows].tolist() == [[True] * 4 + [False]] * int(enc_rows.sum())
    assert ((trace.experts >= 0) == ran[..., None]).all()     # -1 exactly where a layer did not run
    # the encoder rows' routing is the model's own (a plain forward's aux, real tokens in order)
    from moex.model import build
    _, aux = build(cfg).apply({"params": params}, ids, mask)
    want = np.stack([np.asarray(aux["encoder"][i]["expert_ids"])[mask.astype(bool)]
                     for i in range(4)], axis=1)
    np.testing.assert_array_equal(trace.experts[enc_rows][:, :4], want)
    back = Trace.load(trace.save(tmp_path / "t.npz"))
    assert back.encoder_layers == trace.encoder_layers and back.moe_layers == trace.moe_layers
    for name in ("experts", "phase", "position", "forward", "token", "pregate", "request"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    back.check_model(cfg)


@pytest.mark.parametrize("policy,slots", [("lru", 10), ("pregated", 5), ("on-demand", 2)])
def test_replay_of_the_trace_counts_like_the_live_engine(switch, policy, slots):
    cfg, params, store, ids, mask = switch
    eng, _ = generate(cfg, store, policy, slots, ids, mask)
    replay = simulate_stream(stream_from_trace(eng.trace()), policy, slots, store.layers,
                             store.num_experts, expert_bytes=store.expert_bytes)
    live = eng.core.stats
    assert (replay.stats.hits, replay.stats.misses, replay.stats.prefetches) == \
        (live.hits, live.misses, live.prefetches)


def test_engine_refuses_what_it_does_not_run(switch):
    cfg, params, store, ids, mask = switch
    with pytest.raises(ValueError, match="quantized slots are not available"):
        Seq2SeqOffloadEngine(cfg, None, "lru", store.total_bytes, store=store,
                             quantized_slots=True)
    with pytest.raises(ValueError, match="needs a forecaster"):
        Seq2SeqOffloadEngine(cfg, None, "predictive", store.total_bytes, store=store)
