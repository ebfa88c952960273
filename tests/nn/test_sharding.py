"""Logical axis annotations, the rules table, Plan specs and the multi-host launch, on one device
(the sharded models themselves: tests/multidevice, run on 8 virtual devices)."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from moex.config import get_config
from moex.model import abstract_params, param_specs
from moex.nn import sharding
from moex.nn.parallel import all_to_all_volume
from tests.helpers import jitted_forward, random_images, image_prompts, tiny

IS_SPEC = lambda x: isinstance(x, PartitionSpec)


def _mla(name):
    cfg = get_config(name)
    return cfg.replace(name=cfg.name + "-mla", decoder=dataclasses.replace(
        cfg.decoder, attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8))


def _shared(name):
    cfg = get_config(name)
    moe = dataclasses.replace(cfg.decoder.moe, num_shared_experts=1, shared_dim=32,
                              shared_gate="sigmoid")
    return cfg.replace(name=cfg.name + "-shared", decoder=dataclasses.replace(cfg.decoder, moe=moe))


CONFIGS = ["tiny-dense", "tiny-hard", "tiny-soft", "deepseek-vl2-tiny", "qwen3-vl-30b-a3b",
           "moe-llava-phi2-4e"]


@pytest.mark.parametrize("cfg", CONFIGS + [_mla("tiny-hard"), _shared("tiny-hard")],
                         ids=lambda c: c if isinstance(c, str) else c.name)
def test_every_param_has_logical_names_of_its_rank(cfg):
    specs = param_specs(cfg)
    shapes = abstract_params(cfg)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=IS_SPEC)[0]
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    assert len(flat_specs) == len(flat_shapes) > 0
    seen = set()
    for (path, spec), shape in zip(flat_specs, flat_shapes):
        key = jax.tree_util.keystr(path)
        assert len(spec) == len(shape.shape), (key, spec, shape.shape)
        assert set(spec) <= set(sharding.PARAM_NAMES) | {None}, (key, spec)
        seen.update(n for n in spec if n)
        if key.endswith("['w_up']") or key.endswith("['w_down']"):
            assert "experts" in spec, key                  # stacked expert weights
    assert {"embed", "mlp", "heads", "kv", "vocab"} <= seen
    c = get_config(cfg) if isinstance(cfg, str) else cfg
    if c.decoder.moe.kind != "dense":
        assert "experts" in seen


def test_params_stay_plain_arrays():
    _, _, params = tiny("tiny-hard")
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_rules_per_strategy_and_their_union():
    assert sharding.default_rules(("data",)) == (("batch", ("data",)),)
    mixed = dict(sharding.default_rules(("data", "fsdp", "tensor", "expert")))
    assert mixed["batch"] == ("data", "fsdp", "expert")
    assert mixed["embed"] == ("fsdp",) and mixed["experts"] == ("expert",)
    assert mixed["heads"] == mixed["mlp"] == mixed["vocab"] == ("tensor",)
    assert "kv" not in mixed and "act_embed" not in mixed          # never split by default


def _plan(**sizes):
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    return sharding.Plan(mesh, sharding.default_rules(tuple(sizes)))


def test_spec_splits_what_divides_and_uses_each_axis_once():
    plan = _plan(data=2, fsdp=2, tensor=2, expert=2)
    assert plan.spec(("batch", "length", "act_embed"), (8, 5, 64)) == \
        PartitionSpec(("data", "fsdp", "expert"), None, None)
    # 6 rows: data x fsdp = 4 does not divide 6, so only data splits them
    assert plan.spec(("batch", None), (6, 3)) == PartitionSpec("data", None)
    assert plan.spec(("experts", "embed", "mlp"), (4, 64, 30)) == \
        PartitionSpec("expert", "fsdp", "tensor")
    assert plan.spec(("experts", "embed", "mlp"), (5, 63, 31)) == PartitionSpec(None, None, None)
    assert plan.spec(("heads", "heads")) == PartitionSpec("tensor", None)
    one = _plan(data=1)
    assert one.spec(("batch", "embed"), (8, 8)) == PartitionSpec(None, None)


def test_parse_mesh_names_what_is_wrong():
    assert sharding.parse_mesh("data=2, expert=4") == {"data": 2, "expert": 4}
    for bad, why in [("data2", "AXIS=SIZE"), ("model=2", "unknown axis 'model'"),
                     ("data=2,data=2", "given twice"), ("data=0", ">= 1"), ("", "no axes"),
                     ("data=x", "AXIS=SIZE")]:
        with pytest.raises(ValueError, match=why):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="needs 8 devices; 1 available.*XLA_FLAGS"):
        sharding.make_mesh("data=8")


def test_one_device_plan_changes_nothing():
    cfg, model, params = tiny("tiny-hard")
    tokens, mask = image_prompts(cfg, [4, 7])
    images = random_images(cfg, 2)
    plan = sharding.Plan.for_mesh("data=1,expert=1")

    def f(p, t, m, im):
        with sharding.use(plan):
            return model.apply({"params": p}, t, m, im)[0]
    ref = jitted_forward("tiny-hard")(params, tokens, mask, images)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(params, tokens, mask, images)),
                                  np.asarray(ref))
    assert sharding.active() is None


def test_all_to_all_volume_from_shapes():
    hard = all_to_all_volume("hard", groups=2, group_size=10, d_model=8, num_experts=4, top_k=2,
                             capacity_factor=1.0, bytes_per_value=2, expert_ways=4)
    # C = ceil(1.0 * 10 * 2 / 4) = 5 rows per expert per group; out and back
    assert hard["rows_per_group"] == 20 and hard["bytes"] == 2 * 20 * 16 * 2
    assert hard["crossing_bytes"] == hard["bytes"] * 3 // 4
    assert hard["routed_bytes"] == 2 * 10 * 2 * 16 * 2
    dropless = all_to_all_volume("hard", groups=1, group_size=10, d_model=8, num_experts=4,
                                 top_k=2)
    assert dropless["rows_per_group"] == 40
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        all_to_all_volume("dense", groups=1, group_size=1, d_model=1, num_experts=1)


def test_expert_parallel_needs_an_expert_axis_that_divides_the_experts():
    from moex.nn import parallel
    assert parallel.expert_parallel(4) is None                    # no plan
    with sharding.use(_plan(data=2, expert=4)):
        assert parallel.expert_parallel(8) is not None
        assert parallel.expert_parallel(6) is None                # runs unsplit (replicated)
    with sharding.use(_plan(data=8)):
        assert parallel.expert_parallel(8) is None


def test_distributed_launch_from_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert sharding.initialize_distributed({}) is False
    env = {"MOEX_COORDINATOR": "host0:1234", "MOEX_NUM_PROCESSES": "4", "MOEX_PROCESS_ID": "2"}
    assert sharding.initialize_distributed(env) is True
    assert calls[-1] == (("host0:1234", 4, 2), {})
    assert sharding.initialize_distributed({"MOEX_DISTRIBUTED": "auto"}) is True
    assert calls[-1] == ((), {})
    with pytest.raises(ValueError, match="missing.*MOEX_PROCESS_ID"):
        sharding.initialize_distributed({"MOEX_COORDINATOR": "h:1", "MOEX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="MOEX_PROCESS_ID must be"):
        sharding.initialize_distributed({**env, "MOEX_PROCESS_ID": "x"})


@pytest.mark.parametrize("group", ["lm", "vlm"])
def test_train_on_a_mesh_bigger_than_the_machine_fails_before_writing(group, tmp_path, capsys):
    from moex.cli import main
    out = tmp_path / "runs"
    assert main([group, "train", "tiny-hard", "--steps", "1", "--mesh", "data=2,expert=2",
                 "--out", str(out)]) == 2
    assert "needs 4 devices; 1 available" in capsys.readouterr().err
    assert not out.exists()


def test_efficiency_on_a_mesh_bigger_than_the_machine_fails_first(tmp_path, capsys):
    from moex.cli import main
    assert main(["efficiency", "--family", "tiny", "--mesh", "expert=4", "--runs",
                 str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "needs 4 devices; 1 available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
