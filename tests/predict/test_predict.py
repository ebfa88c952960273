"""moex.predict: the corpus, LM training resume, traces -> examples, the routing-path predictor
(loss by hand, it can learn, exact resume, refuses a mismatched model), metrics against brute
force, the scheduler, and the predictor wired into the predictive offload policy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moex.config import get_config
from moex.model import init_params
from moex.predict import corpus
from moex.predict.data import examples
from moex.predict.lm import LMTrainConfig, record_traces, train_lm
from moex.predict.metrics import baselines, batch_acc, evaluate, topk_sets
from moex.predict.model import RPPConfig, bce_loss
from moex.predict.scheduler import objective, schedule, split_caches
from moex.predict.forecast import PredictorForecast
from moex.predict.train import (PredictorTrainConfig, load_predictor, predict,
                                save_predictor, train_predictor)

CFG = get_config("tiny-hard")
LIMIT = 30                                   # stdlib files read by the tests


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def trace(params):
    return record_traces(CFG, params, "code", "heldout", 8, 12, 4, batch=8, corpus_limit=LIMIT,
                         progress=False)


def test_corpus_domains_are_distinct_and_deterministic():
    code, prose = corpus.corpus("code", "train", LIMIT), corpus.corpus("prose", "train", LIMIT)
    assert b"def " in code and b"import " in code and len(prose) > 1000
    assert code.count(b"def ") > 20 * max(prose.count(b"def "), 1) or b"#" not in code[:2000]
    a = corpus.samples("prose", "heldout", 3, 40, seed=5, limit=LIMIT)
    np.testing.assert_array_equal(a, corpus.samples("prose", "heldout", 3, 40, seed=5,
                                                    limit=LIMIT))
    assert a.shape == (3, 40) and a.max() < 256
    code_part, prose_part = corpus.split_source('"""Doc."""\nx = 1  # one\n# alone\ny = 2\n')
    assert code_part == "x = 1\ny = 2\n" and prose_part.split() == ["Doc.", "one", "alone"]
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        corpus.corpus("poetry", "train")


def test_lm_training_resumes_exactly(tmp_path):
    base = dict(preset="tiny-hard", steps=6, batch_size=2, seq_len=16, ckpt_every=2,
                corpus_limit=LIMIT, eval_windows=2)
    full, log = train_lm(LMTrainConfig(**base, out=str(tmp_path / "a")), progress=False)
    part = LMTrainConfig(**base, out=str(tmp_path / "b"))
    train_lm(part, progress=False, stop_at=3)
    assert not (part.run_dir / "model").exists()
    resumed, _ = train_lm(part, progress=False)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), full, resumed))
    assert {"heldout_code", "heldout_prose"} <= set(log[-1])
    assert (part.run_dir / "model" / "config.json").exists()
    # the folder now belongs to this config: logging changes are fine, a longer run is refused
    train_lm(dataclasses.replace(part, ckpt_every=3), progress=False)
    with pytest.raises(ValueError, match=r"steps=8 \(folder: 6\)"):
        train_lm(dataclasses.replace(part, steps=8), progress=False)


def test_examples_from_a_trace(trace):
    ex = examples(trace, gen_len=4)
    assert ex.tokens.shape == (8, 12) and ex.routes.shape == (8, 16, 2, 4)
    assert ex.route_mask.sum() == len(trace) and (ex.routes.sum(-1)[ex.route_mask > 0] == 2).all()
    first = np.flatnonzero(trace.request == ex.requests[0])
    np.testing.assert_array_equal(ex.tokens[0], trace.token[first[:12]])
    assert ex.routes[0, 0, 1, trace.experts[first[0], 1]].all()
    with pytest.raises(ValueError, match="has no token ids"):
        examples(dataclasses.replace(trace, token=None), 4)


def test_bce_loss_by_hand():
    logits = jnp.array([[[[2.0, -1.0]], [[0.5, 0.0]]]])          # (1, 2, 1, 2)
    targets = jnp.array([[[[1, 0]], [[0, 1]]]])
    mask = jnp.array([[1, 0]])                                   # second position ignored
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = -(np.log(sig(2.0)) + np.log(1 - sig(-1.0))) / 2
    assert float(bce_loss(logits, targets, mask)) == pytest.approx(want, rel=1e-6)
    want_both = (want + -(np.log(1 - sig(0.5)) + np.log(sig(0.0))) / 2) / 2
    assert float(bce_loss(logits, targets, jnp.ones((1, 2)))) == pytest.approx(want_both,
                                                                               rel=1e-6)


def rpp_config(**kw):
    return RPPConfig.for_model(CFG, gen_len=4, d_ff=64, max_prompt=32, **kw)


def test_predictor_learns_resumes_exactly_and_round_trips(trace, tmp_path):
    ex = examples(trace, gen_len=4)
    rc = rpp_config()
    tc = PredictorTrainConfig(steps=250, batch_size=8, warmup=10, head_lr=1e-2, body_lr=1e-2)
    params, log = train_predictor(ex, rc, tc, progress=False)
    probs = predict(rc, params, ex.tokens, ex.mask)
    m = evaluate(probs.reshape(-1, 2, 4), ex.routes.reshape(-1, 2, 4), ex.route_mask.ravel(), 2)
    assert m["mean_topk_recall"] == 1.0                     # it can learn (overfits 8 requests)
    short = dataclasses.replace(tc, steps=12)
    a, _ = train_predictor(ex, rc, short, ckpt_dir=tmp_path / "a", progress=False)
    train_predictor(ex, rc, short, ckpt_dir=tmp_path / "b", progress=False, stop_at=5)
    b, _ = train_predictor(ex, rc, short, ckpt_dir=tmp_path / "b", progress=False)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b))
    rc2, loaded = load_predictor(save_predictor(tmp_path / "rpp", rc, params))
    assert rc2 == rc
    np.testing.assert_array_equal(predict(rc, loaded, ex.tokens, ex.mask), probs)


def test_mismatched_predictor_is_refused(trace, params):
    from moex.offload.engine import OffloadEngine
    wrong = dataclasses.replace(rpp_config(), num_experts=8)
    with pytest.raises(ValueError, match=r"\(L, E\) = \(2, 8\).*does not match tiny-hard: it "
                                         r"has 2 MoE layers and 4 experts"):
        OffloadEngine(CFG, params, "predictive", 10**9,
                      forecaster=PredictorForecast(wrong, None))
    with pytest.raises(ValueError, match=r"examples have \(L, E\) = \(2, 4\)"):
        train_predictor(examples(trace, 4), wrong, PredictorTrainConfig(steps=1), progress=False)


def test_predictive_policy_with_the_predictor_is_exact(trace, params):
    from moex.offload.engine import OffloadEngine
    from moex.offload.store import ExpertStore
    ex = examples(trace, gen_len=4)
    rc = rpp_config()
    rparams, _ = train_predictor(ex, rc, PredictorTrainConfig(steps=30, batch_size=8),
                                 progress=False)
    store = ExpertStore.from_params(CFG, params)
    ids, mask = ex.tokens[:3], ex.mask[:3]
    ref = OffloadEngine(CFG, None, "all-resident", store.total_bytes, store=store)
    want = ref.generate(ids, mask, max_new_tokens=4, stop_tokens=(), return_logits=True)
    eng = OffloadEngine(CFG, None, "predictive", 3 * store.expert_bytes, store=store,
                        forecaster=PredictorForecast(rc, rparams))
    got = eng.generate(ids, mask, max_new_tokens=4, stop_tokens=(), return_logits=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logits, want.logits)
    assert eng.core.stats.prefetches > 0


# -- metrics against brute force -----------------------------------------------------------------

def brute_batch_acc(pred_sets, true_sets, b):
    """pred_sets / true_sets: [position][layer] -> python sets."""
    n, layers = len(true_sets), len(true_sets[0])
    acc = []
    for layer in range(layers):
        vals = []
        for s in range(0, n, b):
            rp = set().union(*[pred_sets[i][layer] for i in range(s, min(s + b, n))])
            rt = set().union(*[true_sets[i][layer] for i in range(s, min(s + b, n))])
            vals.append(len(rp & rt) / len(rt))
        acc.append(sum(vals) / len(vals))
    return acc


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), b=st.integers(1, 5))
def test_recall_and_batch_acc_match_brute_force(seed, n, b):
    rng = np.random.default_rng(seed)
    layers, experts, k = 2, 5, 2
    truth = np.zeros((n, layers, experts), bool)
    for i in range(n):
        for layer in range(layers):
            truth[i, layer, rng.choice(experts, k, replace=False)] = True
    scores = rng.random((n, layers, experts))
    pred = topk_sets(scores, k)
    true_sets = [[set(np.flatnonzero(truth[i, l])) for l in range(layers)] for i in range(n)]
    pred_sets = [[set(np.argsort(-scores[i, l], kind="stable")[:k]) for l in range(layers)]
                 for i in range(n)]
    acc, _ = batch_acc(pred, truth, b)
    np.testing.assert_allclose(acc, brute_batch_acc(pred_sets, true_sets, b))
    m = evaluate(scores, truth, np.ones(n), k, batch_sizes=(b,))
    want = [np.mean([len(pred_sets[i][l] & true_sets[i][l]) / k for i in range(n)])
            for l in range(layers)]
    np.testing.assert_allclose(m["topk_recall"], want)
    np.testing.assert_allclose(m[f"b_acc_{b}"], acc)


def test_baselines_by_hand(trace):
    ex = examples(trace, gen_len=4)
    prior = np.full((2, 4), 0.5)
    out = baselines(ex, prior)
    r, p = 0, ex.tokens.shape[1]
    np.testing.assert_array_equal(out["tlp"][r, 1], ex.routes[r, 0])     # previous token
    np.testing.assert_array_equal(out["slp"][r, 3, 1], ex.routes[r, 3, 0])   # previous layer
    np.testing.assert_array_equal(out["slp"][r, 3, 0], prior[0])
    np.testing.assert_array_equal(out["prior"][r, p], prior)


# -- scheduler -----------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), t=st.integers(1, 8))
def test_scheduler_keeps_every_request_and_never_loses_to_fifo(seed, t):
    rng = np.random.default_rng(seed)
    protos = rng.random((3, 2, 6)) < 0.3
    routes = protos[rng.integers(0, 3, 2 * t)] ^ (rng.random((2 * t, 2, 6)) < 0.1)
    a, b = schedule(routes)
    assert len(a) == len(b) == t
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(2 * t))
    fifo = objective(routes, np.arange(t), np.arange(t, 2 * t))
    assert objective(routes, a, b) <= fifo
    with pytest.raises(ValueError, match="splits 2T requests"):
        schedule(np.concatenate([routes, routes[:1]]))


def test_scheduler_separates_clear_clusters():
    x, y = np.zeros((2, 4), bool), np.zeros((2, 4), bool)
    x[:, 0], y[:, 3] = True, True
    routes = np.stack([x, y, x, y])                      # FIFO mixes both kinds in each half
    a, b = schedule(routes)
    assert sorted([a.tolist(), b.tolist()]) == [[0, 2], [1, 3]]
    assert objective(routes, a, b) == 4 < objective(routes, [0, 1], [2, 3]) == 8


def test_kv_caches_follow_their_requests(params):
    from moex.generate import Generator
    from moex.model import build
    from moex.tokenizer import left_pad
    gen = Generator(build(CFG))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, rng.integers(3, 7)).tolist() for _ in range(4)]
    ids, mask = left_pad(prompts, CFG.pad_token_id, 6)
    stop = jnp.asarray([-1], jnp.int32)

    def continue_(cache, tok, steps=3):
        out, done = [np.asarray(tok)], jnp.zeros(tok.shape, bool)
        for i in range(1, steps):
            cache, tok, done, _ = gen.step(params, cache, tok, done, i, stop)
            out.append(np.asarray(tok))
        return np.stack(out, 1)

    halves = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    prefilled = [gen.prefill(params, i, m, max_len=9) for i, m in halves]
    a, b = np.array([0, 3]), np.array([1, 2])             # a schedule mixing the two batches
    ca, cb = split_caches(prefilled[0][0], prefilled[1][0], a, b)
    toks = jnp.concatenate([prefilled[0][1], prefilled[1][1]])
    # (decode steps donate their cache, so the unscheduled run goes after the split)
    want = np.concatenate([continue_(c, t) for c, t, _ in prefilled])
    got_a, got_b = continue_(ca, toks[a]), continue_(cb, toks[b])
    np.testing.assert_array_equal(got_a, want[a])
    np.testing.assert_array_equal(got_b, want[b])


def test_predictor_cli_train_and_eval(trace, tmp_path, capsys):
    from moex.cli import main
    path = trace.save(tmp_path / "code.npz")
    out = tmp_path / "rpp"
    assert main(["predictor", "train", str(path), "--out", str(out), "--gen-len", "4",
                 "--d-ff", "64", "--steps", "20", "--batch-size", "4"]) == 0
    assert (out / "rpp.json").exists() and (out / "params").exists()
    assert main(["predictor", "eval", str(out), str(path), "--prior-trace", str(path),
                 "--out", str(tmp_path / "eval")]) == 0
    text = capsys.readouterr().out
    for method in ("rpp", "prior", "tlp", "slp", "pregate"):
        assert f"| {method} |" in text
    import json
    report = json.loads((tmp_path / "eval" / "predictor_eval.json").read_text())
    assert len(report["traces"]["code.npz"]["rpp"]["b_acc_32"]) == 2       # per layer
    # predictive:DIR in `moex generate` is this predictor (it once fell back to the prior),
    # and the tokens are those of the plain generator
    gen = ["generate", "tiny-hard", "--prompt", "def f(x):", "--prompt", "import os",
           "--max-new-tokens", "4"]
    assert main(gen) == 0
    plain = capsys.readouterr().out
    assert main(gen + ["--offload", f"predictive:{out}", "--expert-budget", "50%"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    stats = json.loads(captured.err.strip().splitlines()[-1])["offload"]
    assert stats["policy"] == "predictive" and stats["forecast"] == "rpp"
    assert stats["prefetches"] > 0
    assert main(gen + ["--offload", f"predictive:{tmp_path / 'eval'}"]) == 2
    assert "neither a built-in forecast" in capsys.readouterr().err
