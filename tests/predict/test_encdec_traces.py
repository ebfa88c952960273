"""The routing-path predictor, its baselines and metrics, the forecasters and the token scheduler
on encoder-decoder traces (format: `moex.offload.trace`), built by hand: 6 requests with encoder
inputs of 5-9 tokens, 4 decoder steps, MoE blocks 1 and 3 of a 4 + 4 block model (global MoE
layer ids 1, 3 | 5, 7), 8 experts, top-1.

Routing of the hand-made trace (so every value below can be derived on paper):
  encoder token t, encoder MoE layer j (0, 1):       expert (t + j) % 8
  decoder position s of request r, decoder layer j:  expert 4 * c + (s + j) % 4, c = r % 2
                                                     (= the parity of the request's first token)
  a row's experts are -1 (probs 0) in the other stack's layers; pre-gate: the true expert of
  the second layer of each stack, -1 elsewhere.
"""

import dataclasses

import numpy as np
import pytest

from moex.config import get_config
from moex.offload.forecast import OracleForecast, PriorForecast, used_experts
from moex.offload.trace import Trace
from moex.predict.data import examples
from moex.predict.evaluate import evaluate_predictors, method_scores
from moex.predict.forecast import PredictorForecast
from moex.predict.metrics import baselines, evaluate, frequency_prior, pregate_routes
from moex.predict.model import RPPConfig, bce_loss
from moex.predict.scheduler import objective, routing_vectors, schedule, trace_vectors
from moex.predict.train import PredictorTrainConfig, predict, train_predictor

LENGTHS = (5, 6, 7, 8, 9, 5)            # encoder input per request
STEPS, E, START = 4, 8, 33              # decoder steps, experts, decoder start token id
MOE = [1, 3, 5, 7]                      # encoder blocks 1, 3 -> 1, 3; decoder 1, 3 -> 5, 7
ENC = np.array([True, True, False, False])


def encdec_trace() -> Trace:
    rng = np.random.default_rng(0)
    prompts = []
    for r, n in enumerate(LENGTHS):
        p = rng.integers(0, 32, n)
        p[0] = 2 * rng.integers(0, 16) + r % 2              # parity of the first token = r % 2
        prompts.append(p)
    rows = []                                               # (request, position, phase, fwd,
    for r, p in enumerate(prompts):                         #  token, experts (L,))
        for i, t in enumerate(p):
            rows.append((r, i, 0, 0, t, [(t + j) % E for j in range(2)] + [-1, -1]))
    for s in range(STEPS):
        for r in range(len(prompts)):
            token = START if s == 0 else 40 + s
            rows.append((r, s, 1, 1 + s, token,
                         [-1, -1] + [4 * (r % 2) + (s + j) % 4 for j in range(2)]))
    col = lambda i, dtype: np.array([row[i] for row in rows], dtype)
    experts = col(5, np.int16)[..., None]                   # (N, L, 1)
    probs = np.zeros((len(rows), 4, E), np.float16)
    n, layer = np.nonzero(experts[..., 0] >= 0)
    probs[n, layer, experts[n, layer, 0]] = 1.0
    pregate = np.full_like(experts, -1)
    pregate[:, [1, 3]] = experts[:, [1, 3]]
    return Trace("hand-switch", MOE, E, 1, col(0, np.int32), col(1, np.int32), col(2, np.int8),
                 experts, probs, col(3, np.int32), pregate, col(4, np.int32),
                 encoder_layers=4)


@pytest.fixture(scope="module")
def trace():
    return encdec_trace()


def test_trace_round_trip_and_layer_mask(trace, tmp_path):
    back = Trace.load(trace.save(tmp_path / "t.npz"))
    assert back.encoder_layers == 4 and back.is_encdec and back.moe_layers == MOE
    for name in ("request", "position", "phase", "forward", "experts", "probs", "pregate",
                 "token"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    mask = back.layer_mask()
    encoder_rows = back.phase == 0
    assert (mask[encoder_rows] == ENC).all() and (mask[~encoder_rows] == ~ENC).all()
    assert ((back.experts[..., 0] >= 0) == mask).all()       # -1 exactly where a layer is not run
    both = Trace.concat([back, back])
    assert both.encoder_layers == 4 and len(both) == 2 * len(trace)
    plain = dataclasses.replace(trace, encoder_layers=None)
    assert not plain.is_encdec and plain.layer_mask().all()


def test_examples_layout_masks_and_no_minus_one(trace):
    ex = examples(trace, gen_len=STEPS)
    p = max(LENGTHS)
    assert ex.tokens.shape == (6, p) and ex.routes.shape == (6, p + STEPS, 4, E)
    assert ex.is_encdec and ex.in_encoder.tolist() == ENC.tolist()
    assert ex.first_in_stack.tolist() == [True, False, True, False]
    assert (ex.layer_mask[:, :p] == ENC).all() and (ex.layer_mask[:, p:] == ~ENC).all()
    assert ex.route_mask.sum() == len(trace)
    # request 0: 5 encoder tokens, left-padded, in position order
    rows0 = np.flatnonzero((trace.request == 0) & (trace.phase == 0))
    np.testing.assert_array_equal(ex.tokens[0, p - 5:], trace.token[rows0])
    assert (ex.mask[0] == [0] * (p - 5) + [1] * 5).all()
    # each real (position, layer) it ran has exactly its one expert; nothing elsewhere (-1 never
    # becomes expert E - 1)
    counted = (ex.route_mask[..., None] > 0) & ex.layer_mask
    assert (ex.routes.sum(-1) == counted).all()
    t = ex.tokens[0, p - 1]
    assert ex.routes[0, p - 1, 1, (t + 1) % E]
    assert ex.routes[1, p + 3, 2, 4 + 3]                    # odd request, step 3, layer 0: e 7
    assert ex.routes[0, p + 2].nonzero()[1].tolist() == [2, 3]   # decoder layers 2, 3: e 2, 3
    short = examples(trace, gen_len=2)
    np.testing.assert_array_equal(short.routes, ex.routes[:, :p + 2])
    # a decoder-LM trace: all True and no in_encoder
    plain = examples(dataclasses.replace(trace, encoder_layers=None), gen_len=STEPS)
    assert plain.layer_mask.all() and plain.in_encoder is None and not plain.is_encdec


def test_metrics_count_only_the_layers_a_position_ran():
    # layer 0 = encoder, layer 1 = decoder; positions 0, 1 encoder, 2, 3 decoder; E = 4, top-1
    truth = np.zeros((4, 2, 4), bool)
    truth[0, 0, 0] = truth[1, 0, 1] = truth[2, 1, 2] = truth[3, 1, 2] = True
    scores = np.zeros((4, 2, 4))
    scores[0, 0, 0], scores[1, 0, 2], scores[2, 1, 2], scores[3, 1, 3] = .9, .8, .7, .6
    scores[0, 1, 1] = scores[2, 0, 3] = .95                  # layers not run: never counted
    lm = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)
    m = evaluate(scores, truth, np.ones(4), 1, batch_sizes=(1, 2), layer_mask=lm)
    # top-1 hits: L0 {pos 0}, L1 {pos 2} of 2 positions each -> 0.5, 0.5; at 0.5 the predicted
    # sets are {0: e0, 1: e2} and {2: e2, 3: e3}: precision = recall = 1 / 2
    assert m["topk_recall"] == [0.5, 0.5] and m["precision"] == [0.5, 0.5]
    assert m["recall"] == [0.5, 0.5]
    # b = 2: L0 batch {0, 1}: R_true {0, 1}, R_pred {0, 2} -> 1/2, wasted 1/2; L1 batch {2, 3}:
    # R_true {2}, R_pred {2, 3} -> 1, wasted 1/2
    assert m["b_acc_2"] == [0.5, 1.0] and m["wasted_2"] == [0.5, 0.5]
    assert m["b_acc_1"] == [0.5, 0.5] and m["mean_b_acc_2"] == 0.75
    # without the mask the batch {0, 1} has no true decoder expert and the garbage counts
    plain = evaluate(scores, truth, np.ones(4), 1, batch_sizes=(2,))
    assert plain["b_acc_2"][1] == 0.5 and plain["precision"] != m["precision"]
    # decoder positions only: the encoder's layer has no position and is undefined
    gen = evaluate(scores, truth, np.array([0, 0, 1, 1]), 1, batch_sizes=(2,), layer_mask=lm)
    assert gen["topk_recall"] == [None, 0.5] and gen["mean_b_acc_2"] == 1.0
    # the prior among the positions that ran each layer
    prior = frequency_prior(truth, np.ones(4), lm)
    np.testing.assert_array_equal(prior, [[.5, .5, 0, 0], [0, 0, 1, 0]])


def test_baselines_stay_in_their_stack(trace):
    ex = examples(trace, gen_len=STEPS)
    p = ex.tokens.shape[1]
    prior = frequency_prior(ex.routes.reshape(-1, 4, E), ex.route_mask.ravel(),
                            ex.layer_mask.reshape(-1, 4))
    np.testing.assert_allclose(prior.sum(-1), 1.0)          # top-1 among the rows that ran it
    out = baselines(ex, prior, pregate_routes(trace, ex))
    r = 2
    # TLP: previous encoder token in the encoder's layers; the first decoder position (the start
    # token) has no previous decoder token: prior; the next one reads it
    np.testing.assert_array_equal(out["tlp"][r, p - 1, :2], ex.routes[r, p - 2, :2])
    np.testing.assert_array_equal(out["tlp"][r, p], prior)
    np.testing.assert_array_equal(out["tlp"][r, p + 1, 2:], ex.routes[r, p, 2:])
    # SLP: layer 1 reads layer 0, layer 3 reads layer 2; layer 2 (the decoder's first) is prior
    np.testing.assert_array_equal(out["slp"][r, p + 1, 3], ex.routes[r, p + 1, 2])
    np.testing.assert_array_equal(out["slp"][r, p - 1, 1], ex.routes[r, p - 1, 0])
    np.testing.assert_array_equal(out["slp"][r, p + 1, 2], prior[2])
    # pre-gate: the recorded (perfect) predictions at layers 1, 3, prior at each stack's first
    np.testing.assert_array_equal(out["pregate"][r, p + 1, 3], ex.routes[r, p + 1, 3])
    np.testing.assert_array_equal(out["pregate"][r, p + 1, 2], prior[2])
    assert not pregate_routes(trace, ex)[..., E - 1][~ex.layer_mask].any()
    defined = method_scores(trace, ex, prior)
    assert defined["slp"][1].tolist() == [False, True, False, True]


def test_evaluate_predictors_on_an_encdec_trace(trace, tmp_path):
    path = trace.save(tmp_path / "t.npz")
    report = evaluate_predictors([path], path, gen_len=STEPS)
    alls, gen = report["traces"]["t.npz"], report["generated"]["t.npz"]
    assert alls["slp"]["topk_recall"][0] is None and alls["slp"]["topk_recall"][2] is None
    # pre-gate is perfect wherever it is defined; the prior never predicts across stacks
    assert alls["pregate"]["mean_topk_recall"] == 1.0
    assert gen["prior"]["topk_recall"][:2] == [None, None]
    assert gen["tlp"]["positions"] == 6 * STEPS
    # TLP at steps 1-3 reads step s - 1, whose expert differs (4c + (s - 1 + j) % 4); step 0
    # gets the prior, uniform over the 8 experts in the decoder's layers, whose top-1 (ties to
    # the lower id) is expert 0: the even requests' step-0 expert in layer 2 (j = 0), 3 hits
    # of 24 positions, none in layer 3
    assert gen["tlp"]["topk_recall"] == [None, None, 0.125, 0.0]


def test_bce_loss_ignores_layers_not_run():
    import jax.numpy as jnp
    logits = jnp.array([[[[2.0, -1.0], [9.0, 9.0]]]])         # (1, 1, 2, 2)
    targets = jnp.array([[[[1, 0], [0, 0]]]])
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = -(np.log(sig(2.0)) + np.log(1 - sig(-1.0))) / 2
    lm = jnp.array([[[True, False]]])
    assert float(bce_loss(logits, targets, jnp.ones((1, 1)), lm)) == pytest.approx(want,
                                                                                   rel=1e-6)


def test_predictor_trains_and_forecasts_one_stack_per_forward(trace):
    ex = examples(trace, gen_len=STEPS)
    rc = RPPConfig(4, E, 1, vocab_size=64, d_ff=64, max_prompt=16, gen_len=STEPS,
                   encoder_moe_layers=2)
    tc = PredictorTrainConfig(steps=60, batch_size=6, warmup=5, head_lr=1e-2, body_lr=1e-2)
    params, log = train_predictor(ex, rc, tc, progress=False)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    with pytest.raises(ValueError, match="examples have 2 encoder MoE layers"):
        train_predictor(ex, dataclasses.replace(rc, encoder_moe_layers=None), tc,
                        progress=False)
    f = PredictorForecast(rc, params)
    enc = f.for_forward(0, ex.tokens[:2], ex.mask[:2], prefill=True)
    assert enc.shape == (4, E) and (enc[2:] == 0).all() and (enc[:2] > 0).all()
    probs = predict(rc, params, ex.tokens[:2], ex.mask[:2])
    for s in range(STEPS):
        dec = f.for_forward(1 + s, np.full((2, 1), START), np.ones((2, 1)), prefill=False)
        assert (dec[:2] == 0).all()
        want = 1 - np.prod(1 - probs[:, ex.tokens.shape[1] + s, 2:].astype(np.float64), 0)
        np.testing.assert_allclose(dec[2:], want, rtol=1e-6)
    with pytest.raises(ValueError, match="encoder pass"):
        PredictorForecast(rc, params).for_forward(1, np.ones((1, 1)), np.ones((1, 1)),
                                                  prefill=False)


def test_predictor_config_for_an_encdec_model():
    switch, hard = get_config("tiny-switch"), get_config("tiny-hard")
    rc = RPPConfig.for_model(switch)
    assert (rc.num_layers, rc.encoder_moe_layers, rc.vocab_size) == (4, 2, switch.vocab_size)
    assert RPPConfig.from_json(rc.to_json()) == rc
    rc.check_model(switch)
    dec = RPPConfig.for_model(hard)
    with pytest.raises(ValueError, match="for a decoder LM .* does not match tiny-switch"):
        dataclasses.replace(dec, num_layers=4, num_experts=4).check_model(switch)


def test_oracle_and_prior_forecasts(trace):
    encoder_pass = np.flatnonzero(trace.forward == 0)
    step0 = np.flatnonzero(trace.forward == 1)
    used = used_experts(trace, encoder_pass)
    assert (used[2:] == 0).all() and used[:2].sum() > 0
    dec = OracleForecast(trace).for_forward(1)
    assert (dec[:2] == 0).all()
    assert dec[2:].nonzero()[1].tolist() == [0, 4, 1, 5]        # step 0: 4c + j for c = 0, 1
    prior = PriorForecast.from_trace(trace)
    np.testing.assert_allclose(prior.token_freq.sum(-1), 1.0)
    # among the rows that ran the layer, -1 entries left out: the decoder's layers are uniform
    # (each expert 3 of 24 decoder rows), the encoder's first the encoder tokens' ids mod 8
    np.testing.assert_array_equal(prior.token_freq[2:], 1 / E)
    enc_tokens = trace.token[trace.phase == 0]
    np.testing.assert_allclose(prior.token_freq[0], np.bincount(enc_tokens % E, minlength=E)
                               / len(enc_tokens))
    rows = prior.for_rows(trace, encoder_pass)                 # 40 encoder tokens
    np.testing.assert_allclose(rows[:2], 1 - (1 - prior.token_freq[:2]) ** 40)
    assert (rows[2:] == 0).all() and (prior.for_rows(trace, step0)[:2] == 0).all()
    live = prior.for_forward(0, None, np.ones((5, 8)), prefill=True)
    np.testing.assert_allclose(live, rows)
    live = prior.for_forward(1, None, np.ones((6, 1)), prefill=False)
    np.testing.assert_allclose(live, prior.for_rows(trace, step0))
    switch = get_config("tiny-switch")                         # the trace's layout, 8 experts
    switch = switch.replace(encoder_moe=dataclasses.replace(switch.encoder_moe, num_experts=E),
                            decoder_moe=dataclasses.replace(switch.decoder_moe, num_experts=E))
    prior.check_model(switch)
    with pytest.raises(ValueError, match="prior does not match tiny-switch"):
        PriorForecast(prior.token_freq).check_model(switch)


def test_scheduler_resplits_decoder_tokens_on_decoder_layers(trace):
    step = np.flatnonzero(trace.forward == 2)                   # decode step 1, requests 0..5
    vectors = trace_vectors(trace, step)
    assert vectors.shape == (6, 2, E) and (vectors.sum(-1) == 1).all()
    raw = routing_vectors(trace.experts[step], E)               # all layers: -1 is no expert
    assert not raw[:, :2].any() and (raw[:, 2:] == vectors).all()
    a, b = schedule(vectors)
    # requests of one parity share their experts: the split separates them (4 distinct experts
    # over the two layers and halves, against FIFO's 8)
    assert sorted([a.tolist(), b.tolist()]) == [[0, 2, 4], [1, 3, 5]]
    assert objective(vectors, a, b) == 4 < objective(vectors, [0, 1, 2], [3, 4, 5]) == 8
    # a predictor's grid (top-k in every layer) gives the same split once the encoder's
    # layers are left out
    grid = np.ones((6, 4, E), bool)
    grid[:, 2:] = vectors
    assert [x.tolist() for x in schedule(grid, layers=~ENC)] == [a.tolist(), b.tolist()]
    with pytest.raises(ValueError, match="mix an encoder-decoder's encoder and decoder"):
        trace_vectors(trace, np.concatenate([step, [0]]))


def test_lm_trace_records_an_encoder_decoder_on_its_denoising_inputs():
    """`moex lm trace` on an encoder-decoder: span-corrupted windows as encoder inputs (the
    sentinels in them), the all-resident engine's trace: encoder rows, then decoder steps."""
    from moex.config import get_config
    from moex.model import init_params
    from moex.predict.lm import denoising_inputs, record_traces
    cfg = get_config("tiny-switch")
    ids, mask = denoising_inputs(cfg, "prose", "heldout", 3, 24, seed=1, corpus_limit=20)
    assert (ids > cfg.eos_token_id).any(axis=1).all()           # every row holds a sentinel
    trace = record_traces(cfg, init_params(cfg, 0), "prose", "heldout", 3, 24, 4, batch=2,
                          seed=1, corpus_limit=20, progress=False)
    enc = trace.phase == 0
    assert trace.is_encdec and enc.sum() == mask.sum() and (~enc).sum() == 3 * 4
    np.testing.assert_array_equal(np.sort(np.unique(trace.request)), [0, 1, 2])
    np.testing.assert_array_equal(trace.token[enc][:ids.shape[1]], ids[0])
    assert ((trace.experts >= 0) == trace.layer_mask()[..., None]).all()
