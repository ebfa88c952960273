"""`moex bench offload` end to end on a tiny preset, budget parsing, and
`moex generate --offload` giving the tokens of the plain generator."""

import csv
import json

import pytest

from moex.cli import main
from moex.offload.spec import PolicySpec, budget_slots, parse_budget, parse_policy


def test_parse_budget_and_policy_specs():
    assert parse_budget("25%", 1000) == 250 and parse_budget("0.5", 1000) == 500
    assert parse_budget("64MB", 1) == 64_000_000 and parse_budget("1.5GiB", 1) == 3 * 2**29
    assert parse_budget("4096", 10**9) == 4096
    for bad in ("lots", "150%", "0"):
        with pytest.raises(ValueError, match="expert budget"):
            parse_budget(bad, 1000)
    assert budget_slots(parse_budget("50%", 1000), 300) == 1
    assert parse_policy("predictive:oracle") == PolicySpec("predictive", "oracle")
    assert parse_policy("predictive:prior").label == "predictive:prior"
    assert parse_policy("lru") == PolicySpec("lru") and parse_policy("lru").label == "lru"
    with pytest.raises(ValueError, match="predictive takes a forecast"):
        parse_policy("predictive")
    with pytest.raises(ValueError, match="only predictive takes a forecast"):
        parse_policy("lru:oracle")
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        parse_policy("fifo")


def test_predictor_folder_policy_is_checked(tmp_path):
    """predictive:DIR names a trained predictor; a folder without one is refused by name."""
    (tmp_path / "rpp").mkdir()
    with pytest.raises(ValueError, match="neither a built-in forecast.*rpp.json"):
        parse_policy(f"predictive:{tmp_path / 'rpp'}")
    (tmp_path / "rpp" / "rpp.json").write_text("{}")
    spec = parse_policy(f"predictive:{tmp_path / 'rpp'}")
    assert spec.predictor == str(tmp_path / "rpp") and spec.label == "predictive:rpp"


def test_bench_offload_grid_writes_every_point(tmp_path, capsys):
    out = tmp_path / "offload"
    policies = ["all-resident", "lru", "pregated", "predictive:oracle"]
    rc = main(["bench", "offload", "--preset", "tiny-hard", "--batch", "1", "2",
               "--budgets", "100%", "50%", "--policies", *policies, "--new-tokens", "3",
               "--prompt-len", "6", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    # all-resident only at 100 %: per batch 4 + 3 points
    assert len(rows) == 2 * 7
    assert {(r["batch"], r["budget"], r["policy"]) for r in rows} == {
        (b, bud, p) for b in ("1", "2") for bud in ("100%", "50%") for p in policies
        if p != "all-resident" or bud == "100%"}
    for r in rows:
        assert all(v != "" for v in r.values()), r
        assert float(r["decode_tok_s"]) > 0 and r["memory_kind"] == "pinned_host"
        assert int(r["peak_pool_bytes"]) <= int(r["budget_bytes"])
        assert float(r["belady_hit_rate"]) >= float(r["reuse_rate"]) - 1e-12
        # every rate is also a ratio to the model without offloading, measured in the run
        assert float(r["ratio_to_jitted"]) == pytest.approx(
            float(r["decode_tok_s"]) / float(r["jitted_decode_tok_s"]))
        assert float(r["recomputed"]) >= 0
        if r["policy"] == "all-resident":           # preloaded: nothing missed or recomputed
            assert float(r["recomputed"]) == 0 and float(r["hit_rate"]) == 1.0
    meta = json.loads((out / "report.md").parent.joinpath("results.json").read_text())
    assert meta["config"]["preset"] == "tiny-hard" and "jax" in meta["environment"]
    report = (out / "report.md").read_text()
    assert "| B | budget | policy |" in report and "| B | jitted decode tok/s" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_generate_with_offload_gives_the_same_tokens(capsys):
    args = ["generate", "tiny-hard", "--prompt", "offload", "--prompt", "me", "--max-new-tokens",
            "4"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--offload", "pregated", "--expert-budget", "40%"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["offload"]["policy"] == "pregated" and stats["offload"]["slots"] == 3
    assert main(args + ["--offload", "lru", "--expert-budget", "1B"]) == 2
    assert "holds no expert" in capsys.readouterr().err


def test_random_prompts_of_a_vlm_never_hold_the_image_placeholder():
    """A word-level VLM's image id (4) lies among the random tokens' ids: prompts without images
    must not hold it (the model would refuse a row with 1 of its 36 placeholders)."""
    from moex.checkpoint import LoadedModel
    from moex.config import get_config
    from moex.experiments.offload_grid import OffloadBenchConfig, domain_of, prompts
    model = LoadedModel(get_config("mini-hard"), None, None, "shapes only")
    ids, mask, images = prompts(model, 8, 64, seed=0)
    assert images is None and ids.max() >= 4 and not (ids == 4).any()
    assert domain_of(OffloadBenchConfig(preset="mini-hard"), model) == "random"   # a preset
    assert domain_of(OffloadBenchConfig(checkpoint="ckpt"), model) == "vlm"       # its task


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    """A mini-hard VLM checkpoint (random weights) with its task tokenizer, and the synthetic
    data it reads questions from."""
    from moex import checkpoint
    from moex.config import get_config
    from moex.data import SyntheticSpec, write_synthetic
    from moex.data.vocab import synthetic_tokenizer, write_tokenizer
    from moex.model import init_params
    root = tmp_path_factory.mktemp("vlm")
    write_tokenizer(synthetic_tokenizer(), root)
    path = checkpoint.save(root / "model", get_config("mini-hard"), init_params("mini-hard"),
                           copy_from=root)
    data = root / "data"
    write_synthetic(data, SyntheticSpec())
    return path, data


def test_bench_offload_on_vlm_prompts_with_images(tmp_path, vlm_checkpoint):
    model, data = vlm_checkpoint
    out = tmp_path / "offload"
    assert main(["bench", "offload", "--checkpoint", str(model), "--domain", "vlm", "--data",
                 str(data), "--batch", "2", "--budgets", "100%", "50%", "--policies",
                 "all-resident", "lru", "--new-tokens", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["budget"], r["policy"]) for r in rows] == [
        ("100%", "all-resident"), ("100%", "lru"), ("50%", "lru")]
    # the prompts are the questions' compact prompts: 36 image tokens and the text
    assert all(int(r["prompt_len"]) > 36 for r in rows)


def test_vlm_trace_command_labels_requests_by_category(tmp_path, vlm_checkpoint):
    from moex.offload.trace import Trace
    model, data = vlm_checkpoint
    path = tmp_path / "vlm.npz"
    assert main(["vlm", "trace", str(model), "--out", str(path), "--questions", "6",
                 "--batch", "4", "--new-tokens", "2", "--data", str(data)]) == 0
    trace = Trace.load(path)
    assert trace.domain == "vlm" and trace.request_labels == [
        "color", "shape", "count", "position", "color", "shape"]
    assert sorted(set(trace.request.tolist())) == list(range(6))
    assert (trace.phase == 1).sum() == 6 * 1 and trace.token is not None


def test_bench_offload_quantized_stores_and_miss_options(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["bench", "offload", "--preset", "tiny-hard", "--batch", "2", "--budgets", "50%",
                 "--policies", "lru", "--expert-dtype", "native", "int4", "--misses", "load",
                 "low+host", "--new-tokens", "3", "--prompt-len", "6",
                 "--repeats", "1", "--out", str(out)]) == 0
    rows = {(r["expert_dtype"], r["miss_option"]): r
            for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {(d, m) for d in ("native", "int4") for m in ("load", "low:int4+host")}
    # int4 routes a little differently (its weights differ), so compare bytes per load
    per_load = {k: int(r["bytes_moved"]) / int(r["misses"]) for k, r in rows.items()
                if k[1] == "load"}
    assert per_load["native", "load"] >= 7 * per_load["int4", "load"] > 0     # fp32 -> int4
    for r in rows.values():
        assert int(r["served_low"]) + int(r["served_host"]) <= int(r["misses"])
    assert "int4 / load" in (out / "report.md").read_text()
    args = ["generate", "tiny-hard", "--prompt", "offload", "--max-new-tokens", "3",
            "--offload", "lru", "--expert-budget", "50%"]
    capsys.readouterr()
    assert main(args + ["--expert-dtype", "int4", "--misses", "low:int8+host"]) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["offload"]
    assert stats["expert_dtype"] == "int4" and stats["low_dtype"] == "int8"
    assert stats["miss_option"] == "low:int8+host"
    assert main(args + ["--expert-dtype", "int3"]) == 2
    assert "expected native, int8, int4" in capsys.readouterr().err
