"""`moex bench sharding`: the tables from shapes, and its command line (the timed part runs on
8 devices in tests/multidevice)."""

from moex.cli import parser
from moex.cli.args import from_args
from moex.experiments import sharding_bench
from moex.experiments.sharding_bench import ShardingBenchConfig


def test_volumes_at_the_7b_shapes_from_hand_counts():
    rows = {(r["block"], r["point"], r["capacity"]): r for r in sharding_bench.volume_rows()}
    hard = rows[("decoder hard MoE", "prefill B=1, T=640 (576 image + 64 text)", "dropless (C = S)")]
    # 4 experts x C = 640 rows, D = 4096 out and back, bf16
    assert hard["rows_per_group"] == 4 * 640
    assert hard["bytes"] == 4 * 640 * (4096 + 4096) * 2
    assert hard["routed_bytes"] == 640 * 2 * (4096 + 4096) * 2      # top-2 pairs only
    capped = rows[("decoder hard MoE", "prefill B=1, T=640 (576 image + 64 text)", "cf 1.25")]
    assert capped["rows_per_group"] == 4 * 400                       # ceil(1.25 * 640 * 2 / 4)
    soft = rows[("vision Soft MoE", "one image", "64 x 9 slots")]
    assert soft["bytes"] == 64 * 9 * (1024 + 1024) * 2               # slots x d, both ways
    assert soft["crossing_bytes"] == soft["bytes"] * 3 // 4


def test_strategies_table_lists_every_mesh_axis():
    md = sharding_bench.strategies_md()
    for axis in ("data", "fsdp", "tensor", "expert"):
        assert f"| {axis} |" in md


def test_the_rerun_command_line_gives_the_same_run():
    run = ShardingBenchConfig(presets=("tiny-hard",), meshes=("expert=4,data=2", "data=8"),
                              batch=4, seq_len=32, repeats=2, train=False, out="x")
    args = parser().parse_args(sharding_bench.bench_args(run))
    assert from_args(ShardingBenchConfig, args) == run
    assert sharding_bench.devices_needed(run) == 8
