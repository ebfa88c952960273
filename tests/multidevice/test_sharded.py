"""Sharded models on 8 virtual CPU devices against the single-device model (run by
tests/test_multidevice.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8).

Strategies: data, fsdp, tensor, expert and mixed meshes; every tiny preset (dense, hard, soft):
the forward within 1e-5 and 8 greedy tokens equal; expert-parallel dispatch against the plain
loop and the single-device capacity router; 20 sharded training steps against unsharded; orbax
checkpoints restored onto another mesh.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex import checkpoint
from moex.cli import main as cli_main
from moex.config import MoEConfig
from moex.generate import Generator
from moex.model import aux_loss, build, shard_params
from moex.nn import parallel, sharding
from moex.nn.experts import experts_loop
from moex.nn.moe import HardMoE, SoftMoE
from moex.nn.sharding import Plan, unbox
from moex.predict.lm import LMTrainConfig, train_lm
from moex.training import Checkpoints, TrainState, adamw, fit, make_step, train_model_config
from tests.helpers import TINY, image_prompts, random_images, tiny

assert jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()} (XLA_FLAGS)"

MESHES = ("data=8", "fsdp=8", "tensor=4,data=2", "expert=4,data=2", "fsdp=2,tensor=2,expert=2")


def _batch(cfg, b=8):
    tokens, mask = image_prompts(cfg, [5 + (3 * i) % 11 for i in range(b)], seed=1)
    return np.asarray(tokens), np.asarray(mask), random_images(cfg, b, seed=2)


def _apply(model, plan):
    def f(p, t, m, im):
        with sharding.use(plan):
            return model.apply({"params": p}, t, m, im)[0]
    return jax.jit(f)


@pytest.mark.parametrize("name", TINY)
def test_forward_and_generation_match_one_device(name):
    cfg, model, params = tiny(name)
    tokens, mask, images = _batch(cfg)
    ref = np.asarray(_apply(model, None)(params, tokens, mask, images))
    ref_gen = Generator(model)(params, tokens, mask, images, max_new_tokens=8,
                               stop_tokens=()).tokens
    for mesh in MESHES:
        plan = Plan.for_mesh(mesh)
        sp = shard_params(cfg, params, plan)
        f = _apply(model, plan)
        args = sharding.put_batch(plan, (tokens, mask, images))
        out = f(sp, *args)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0, err_msg=mesh)
        if plan.size("expert") > 1 and cfg.decoder.moe.kind == "hard":
            assert "all_to_all" in f.lower(sp, *args).as_text(), mesh   # expert-parallel MoE
        got = Generator(model, plan)(sp, tokens, mask, images, max_new_tokens=8,
                                     stop_tokens=()).tokens
        np.testing.assert_array_equal(got, ref_gen, err_msg=mesh)


def _hard_block(capacity_factor, e=8, k=2):
    cfg = MoEConfig(kind="hard", num_experts=e, top_k=k, expert_dim=24,
                    capacity_factor=capacity_factor)
    block = HardMoE(cfg, "swiglu")
    x = jax.random.normal(jax.random.key(3), (6, 10, 16))       # 6 groups: padded to 8 shards
    params = unbox(block.init(jax.random.key(4), x)["params"])
    return block, params, x


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_expert_parallel_dispatch_equals_loop_and_single_device_drops(capacity_factor):
    block, params, x = _hard_block(capacity_factor)
    mask = jnp.asarray(np.random.default_rng(0).random(x.shape[:2]) > 0.2)
    single = block.apply({"params": params}, x, mask, method=HardMoE.route)
    plan = Plan.for_mesh("expert=4,data=2")

    def run(p, x, mask):
        with sharding.use(plan):
            return block.apply({"params": p}, x, mask)
    y, aux = jax.jit(run)(shard_params_block(params, plan), x, mask)
    kept = np.asarray(aux["weights"]) > 0
    assert np.array_equal(np.asarray(aux["expert_ids"]), np.asarray(single.expert_ids))
    assert np.array_equal(kept, np.asarray(single.kept) & (np.asarray(single.weights) > 0))
    if capacity_factor is None:
        assert np.array_equal(np.asarray(single.kept), np.asarray(mask)[..., None]
                              .repeat(2, -1)), "dropless: every valid pair kept"
    else:
        assert (~np.asarray(single.kept) & np.asarray(mask)[..., None]).any(), "drops expected"
    ref = experts_loop(params["experts"], x, single, "swiglu")
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=0)


def shard_params_block(params, plan):
    """A block's params placed by hand: experts split over the expert axis."""
    def place(path, v):
        names = ("experts",) + (None,) * (v.ndim - 1) if "experts" in jax.tree_util.keystr(
            path) else (None,) * v.ndim
        return jax.device_put(v, plan.sharding(names, v.shape))
    return jax.tree_util.tree_map_with_path(place, params)


def test_soft_moe_expert_parallel_equals_single_device():
    cfg = MoEConfig(kind="soft", num_experts=8, expert_dim=20, soft_slots=3)
    block = SoftMoE(cfg, "gelu")
    x = jax.random.normal(jax.random.key(5), (4, 12, 16))
    params = unbox(block.init(jax.random.key(6), x)["params"])
    ref, _ = block.apply({"params": params}, x)
    plan = Plan.for_mesh("expert=8")

    def run(p, x):
        with sharding.use(plan):
            return block.apply({"params": p}, x)[0]
    f = jax.jit(run)
    sp = shard_params_block(params, plan)
    np.testing.assert_allclose(np.asarray(f(sp, x)), np.asarray(ref), atol=1e-5, rtol=0)
    assert "all_to_all" in f.lower(sp, x).as_text()
    vol = parallel.all_to_all_volume("soft", groups=4, group_size=12, d_model=16, num_experts=8,
                                     slots=3, bytes_per_value=4, expert_ways=8)
    assert vol["bytes"] == 2 * 4 * 8 * 3 * 16 * 4        # slots x d per group, both ways


def _losses(name, mesh, steps=20):
    cfg, _, params = tiny(name)
    tcfg = train_model_config(cfg, 1.5)
    model = build(tcfg)
    opt = adamw(3e-3, 2, steps)
    plan = None if mesh is None else Plan.for_mesh(mesh)
    params = jax.tree.map(jnp.copy, params)         # the step donates the state
    state = TrainState.sharded(cfg, params, opt, plan)

    def loss_fn(p, batch):
        tokens, mask, images = batch
        logits, _, aux = model.apply({"params": p}, tokens[:, :-1], mask[:, :-1], images)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        ce = (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()
        return ce + aux_loss(aux, tcfg), {}
    step = make_step(loss_fn, opt, plan, plan and state.shardings())
    data = _batch(cfg)
    state, log = fit(state, step, lambda i: data, steps, log_every=1, progress=False, plan=plan)
    return [e["loss"] for e in log], state


@pytest.mark.parametrize("name,mesh", [("tiny-hard", "fsdp=2,tensor=2,expert=2")])
def test_training_20_steps_matches_unsharded(name, mesh):
    ref, _ = _losses(name, None)
    got, state = _losses(name, mesh)
    assert len(got) == 20
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert ref[-1] < ref[0]
    w = state.params["decoder"]["layer_0"]["attn"]["q"]
    assert w.sharding.mesh.shape == dict(Plan.for_mesh(mesh).mesh.shape)


def test_train_checkpoint_restores_onto_another_mesh(tmp_path):
    cfg, _, params = tiny("tiny-hard")
    opt = adamw(1e-3, 1, 4)
    a = TrainState.sharded(cfg, params, opt, Plan.for_mesh("data=2,expert=4"))
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(a)
    other = Plan.for_mesh("fsdp=4,tensor=2")
    like = TrainState.sharded(cfg, jax.tree.map(jnp.zeros_like, params), opt, other)
    b = Checkpoints(tmp_path / "ckpt").restore(like)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    w = b.params["decoder"]["layer_0"]["ffn"]["experts"]["w_up"]      # (E, D, F)
    assert w.sharding.spec == other.spec(("experts", "embed", "mlp"), w.shape)
    assert w.sharding.spec[1] == "fsdp"


def test_moex_checkpoint_of_sharded_params_loads_onto_another_mesh(tmp_path):
    cfg, model, params = tiny("tiny-hard")
    sp = shard_params(cfg, params, Plan.for_mesh("expert=4,tensor=2"))
    checkpoint.save(tmp_path / "m", cfg, sp)
    cfg2, loaded, _ = checkpoint.load(tmp_path / "m", as_numpy=True)
    plan = Plan.for_mesh("data=2,fsdp=4")
    moved = shard_params(cfg2, loaded, plan)
    tokens, mask, images = _batch(cfg)
    ref = _apply(model, None)(params, tokens, mask, images)
    out = _apply(model, plan)(moved, *sharding.put_batch(plan, (tokens, mask, images)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_lm_train_command_on_a_mesh(tmp_path):
    """`moex lm train --mesh`: trains sharded and publishes the model (a run resumed on another
    mesh restores through the same Checkpoints.restore as test_train_checkpoint_restores_...)."""
    out = tmp_path / "lm"
    assert cli_main(["lm", "train", "tiny-hard", "--steps", "2", "--batch-size", "8",
                     "--seq-len", "16", "--warmup", "1", "--eval-windows", "2", "--out", str(out),
                     "--mesh", "data=2,expert=4"]) == 0
    log = checkpoint.metadata(out / "tiny-hard" / "model")["log"]
    assert [e["step"] for e in log] == [2] and np.isfinite(log[-1]["heldout_code"])
    assert Checkpoints(out / "tiny-hard" / "train").latest() == 2


@pytest.mark.parametrize("mesh", ["expert=4,data=2", "expert=8"])
def test_ragged_dispatch_equals_loop(mesh):
    """The dropless ragged path (GPU / TPU) with the exchange emulated by a padded all_to_all:
    the sorting, per-peer counts and offsets, the grouped matmul on received rows and the
    return trip give the plain loop's outputs."""
    block, params, x = _hard_block(None)
    mask = jnp.asarray(np.random.default_rng(1).random(x.shape[:2]) > 0.3)
    single = block.apply({"params": params}, x, mask, method=HardMoE.route)
    plan = Plan.for_mesh(mesh)
    route_fn = block.apply({"params": params}, method=lambda m: m.router.route_fn())
    sp = shard_params_block(params, plan)
    y, routing = jax.jit(lambda p, x, mask: parallel.hard_moe_ragged(
        plan, x, mask, p["router"]["kernel"], p["experts"], route_fn, "swiglu", jnp.float32,
        exchange=parallel.ragged_all_to_all_reference))(sp, x, mask)
    assert np.array_equal(np.asarray(routing.expert_ids), np.asarray(single.expert_ids))
    ref = experts_loop(params["experts"], x, single, "swiglu")
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=0)


def test_ragged_all_to_all_is_not_compiled_on_cpu_so_the_capacity_path_runs():
    assert parallel.ragged_supported("cpu") is False


def test_efficiency_grid_runs_sharded():
    """`moex efficiency --mesh`: the throughput / memory grid on a mesh, the same columns."""
    from moex.experiments.efficiency import EfficiencyConfig, grid_rows, random_models
    from moex.experiments.efficiency import TIMING_KEYS
    hard = random_models("tiny", 0)[1]
    study = EfficiencyConfig(mesh="expert=4,data=2", decode_steps=2, warmup=1, repeats=1)
    row, = grid_rows([hard], [(8, 32)], study)
    assert row["mesh"] == "data=2,expert=4" and row["model"] == "tiny-hard"
    assert all(row[k] > 0 for k in TIMING_KEYS)
    experts = sum(v.size * 4 for k, v in jax.tree_util.tree_flatten_with_path(hard.params)[0]
                  if "['experts']" in jax.tree_util.keystr(k))
    assert row["param_bytes_experts"] == experts        # global sizes, not one shard's


def test_generate_command_on_a_mesh_prints_what_one_device_prints(capsys):
    args = ["generate", "tiny-hard", "--prompt", "def f(", "--prompt", "import os",
            "--max-new-tokens", "6"]
    assert cli_main(args) == 0
    one = capsys.readouterr().out
    assert cli_main(args + ["--mesh", "expert=2,tensor=2"]) == 0
    assert capsys.readouterr().out == one
    assert cli_main(args + ["--mesh", "data=2", "--offload", "lru"]) == 2
    assert "one device" in capsys.readouterr().err


def test_sharding_bench_times_a_mesh_against_one_device(tmp_path):
    from moex.experiments import sharding_bench
    run = sharding_bench.ShardingBenchConfig(presets=("tiny-hard",), meshes=("expert=4,data=2",),
                                             batch=8, seq_len=16, repeats=1, train=False,
                                             out=str(tmp_path / "b"))
    assert sharding_bench.main(run) == 0
    rows = list(__import__("csv").DictReader(open(tmp_path / "b" / "results.csv")))
    assert [r["mesh"] for r in rows] == ["1 device", "expert=4,data=2"]
    assert float(rows[1]["max_abs_logit_diff_vs_1_device"]) < 1e-5
    assert (tmp_path / "b" / "volumes.csv").is_file() and (tmp_path / "b" / "report.md").is_file()
