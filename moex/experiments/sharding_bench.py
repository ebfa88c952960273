"""`moex bench sharding` (experiments/bench_sharding.py): the sharding strategies, what each
moves, and step times on a mesh against one device.

    python experiments/bench_sharding.py                     # 8 virtual CPU devices
    python experiments/bench_sharding.py --presets small-hard --meshes expert=8 data=8

Three parts, one report:
  1. the strategies table: for each mesh axis, the logical names it splits (moex.nn.sharding
     STRATEGIES) -- which params and activations that divides, what it communicates;
  2. all-to-all volumes per MoE layer from shapes at llava-1.5-7b-hard / -soft (prefill of one
     576-image-token prompt, and a decode step of a batch), bf16 (moex.nn.parallel);
  3. forward and train-step times of each preset on each mesh against one device, measured in
     the same run (compile time apart; medians of `repeats`). On a CPU the "devices" are
     threads of one host, so this is not a speed claim, only a check that no strategy blows up
     compile or run time.
On a host with fewer devices than the largest mesh and a CPU backend, the command re-runs itself
in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N (jax fixes the device
count at start-up). Results: results.csv (timings), volumes.csv, results.json, report.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moex.config import get_config
from moex.experiments.throughput import make_batch
from moex.measure import md_table, measure, write_csv, write_outputs
from moex.model import aux_loss, build, init_params, shard_params
from moex.nn import sharding
from moex.nn.parallel import all_to_all_volume
from moex.training import TrainState, adamw, make_step, train_model_config

ROLES = {
    "data": ("batch split; params replicated", "gradient all-reduce"),
    "fsdp": ("batch split; every param's embed axis split", "param all-gather per use, "
             "gradient reduce-scatter"),
    "tensor": ("heads, MLP / expert width, vocabulary split (params and activations)",
               "activation all-reduce after attention and MLP"),
    "expert": ("experts (and Soft MoE slots) split; the batch outside MoE blocks",
               "two all-to-alls per MoE block (tokens / slots out and back)"),
}


@dataclasses.dataclass(frozen=True)
class ShardingBenchConfig:
    presets: tuple[str, ...] = ("tiny-dense", "tiny-hard", "tiny-soft", "small-hard")
    meshes: tuple[str, ...] = ("data=8", "fsdp=8", "tensor=4,data=2", "expert=4,data=2",
                               "fsdp=2,tensor=2,expert=2")
    batch: int = 8
    seq_len: int = 64
    warmup: int = 1
    repeats: int = 5
    train: bool = True                  # also time a train step (forward + backward + AdamW)
    out: str = "results/bench_sharding"


def strategies_md() -> str:
    rows = [[axis, ", ".join(names), *ROLES[axis]] for axis, names in sharding.STRATEGIES.items()]
    return md_table(["mesh axis", "logical names it splits", "what is split", "communication"],
                    rows)


def volume_rows() -> list[dict]:
    """All-to-all bytes per MoE layer at the 7B presets' shapes (bf16), expert axis of 4."""
    rows = []
    hard, soft = get_config("llava-1.5-7b-hard"), get_config("llava-1.5-7b-soft")
    m, d = hard.decoder.moe, hard.decoder.d_model
    for label, groups, size in (("prefill B=1, T=640 (576 image + 64 text)", 1, 640),
                                ("decode step, B=32", 32, 1)):
        for cf in (None, 1.25):
            v = all_to_all_volume("hard", groups=groups, group_size=size, d_model=d,
                                  num_experts=m.num_experts, top_k=m.top_k, capacity_factor=cf,
                                  expert_ways=4)
            rows.append({"preset": hard.name, "block": "decoder hard MoE", "point": label,
                         "capacity": "dropless (C = S)" if cf is None else f"cf {cf}", **v})
    sv = soft.vision
    v = all_to_all_volume("soft", groups=1, group_size=sv.num_patches, d_model=sv.d_model,
                          num_experts=sv.moe.num_experts, slots=sv.moe.soft_slots, expert_ways=4)
    rows.append({"preset": soft.name, "block": "vision Soft MoE", "point": "one image",
                 "capacity": f"{sv.moe.num_experts} x {sv.moe.soft_slots} slots", **v})
    dd = soft.decoder.d_model
    for label, tokens in (("prefill B=1, T=640", 640), ("decode step, B=32", 32)):
        # the causal soft block runs every expert on every token: split experts need an
        # all-reduce (reduce-scatter + all-gather) of the block output, 2 (n-1)/n x T x D
        total = 2 * tokens * dd * 2
        rows.append({"preset": soft.name, "block": "decoder causal soft (all-reduce)",
                     "point": label, "capacity": "no slots", "kind": "soft-causal",
                     "rows_per_group": tokens, "bytes": total,
                     "crossing_bytes": total * 3 // 4, "routed_bytes": total})
    return rows


def volumes_md(rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:.2f}"
    return md_table(["preset", "block", "point", "capacity", "buffer rows / group",
                     "a2a MB (out + back)", "leaves the device (n = 4)", "ragged a2a MB"],
                    [[r["preset"], r["block"], r["point"], r["capacity"],
                      str(r["rows_per_group"]), mb(r["bytes"]), mb(r["crossing_bytes"]),
                      mb(r["routed_bytes"])] for r in rows])


def time_point(name: str, mesh: str | None, run: ShardingBenchConfig):
    """Forward (and train step) compile and run time of `name` on `mesh` (None: one device);
    returns (row, the forward's logits)."""
    cfg = get_config(name)
    plan = None if mesh is None else sharding.Plan.for_mesh(mesh)
    model = build(cfg)
    params = shard_params(cfg, init_params(cfg, 0), plan)
    length = run.seq_len + cfg.vision.num_image_tokens    # the image's tokens + seq_len more
    batch = sharding.put_batch(plan, make_batch(cfg, run.batch, length, np.random.default_rng(0)))

    def fwd(p, t, m, im):
        with sharding.use(plan):
            return model.apply({"params": p}, t, m, im)[0]
    f = jax.jit(fwd)
    t0 = time.perf_counter()
    compiled = f.lower(params, *batch).compile()
    row = {"preset": name, "mesh": mesh or "1 device",
           "devices": 1 if plan is None else plan.mesh.devices.size,
           "forward_compile_s": time.perf_counter() - t0,
           "forward_s": measure(lambda: compiled(params, *batch), warmup=run.warmup,
                                repeats=run.repeats).median}
    logits = np.asarray(compiled(params, *batch))
    if run.train:
        tcfg = train_model_config(cfg, 1.5)
        tmodel, opt = build(tcfg), adamw(1e-3, 1, 100)
        state = TrainState.sharded(cfg, params, opt, plan)

        def loss_fn(p, b):
            t, m, im = b
            logits, _, aux = tmodel.apply({"params": p}, t[:, :-1], m[:, :-1], im)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], -1).mean()
            return ce + aux_loss(aux, tcfg), {}
        step = make_step(loss_fn, opt, plan, plan and state.shardings())
        t0 = time.perf_counter()
        state, loss, _ = step(state, batch)
        jax.block_until_ready(loss)
        row["train_first_step_s"] = time.perf_counter() - t0
        holder = {"state": state}

        def one():
            holder["state"], loss, _ = step(holder["state"], batch)
            return loss
        row["train_step_s"] = measure(one, warmup=run.warmup, repeats=run.repeats).median
    return row, logits


def timing_md(rows: list[dict]) -> str:
    base = {r["preset"]: r for r in rows if r["mesh"] == "1 device"}
    out = []
    for r in rows:
        b = base[r["preset"]]
        cells = [r["preset"], r["mesh"], f"{r['max_abs_logit_diff_vs_1_device']:.1e}",
                 f"{r['forward_compile_s']:.2f}", f"{r['forward_s'] * 1e3:.1f}",
                 f"{r['forward_s'] / b['forward_s']:.2f}x"]
        if "train_step_s" in r:
            cells += [f"{r['train_first_step_s']:.2f}", f"{r['train_step_s'] * 1e3:.1f}",
                      f"{r['train_step_s'] / b['train_step_s']:.2f}x"]
        out.append(cells)
    head = ["preset", "mesh", "max abs logit diff", "forward compile s", "forward ms",
            "vs 1 device"]
    if rows and "train_step_s" in rows[0]:
        head += ["train compile + 1st step s", "train step ms", "vs 1 device"]
    return md_table(head, out)


def devices_needed(run: ShardingBenchConfig) -> int:
    return max(math.prod(sharding.parse_mesh(m).values()) for m in run.meshes)


def main(run: ShardingBenchConfig) -> int:
    need = devices_needed(run)
    if jax.device_count() < need:
        if jax.default_backend() != "cpu" or os.environ.get("MOEX_SHARDING_CHILD"):
            raise ValueError(f"the meshes need {need} devices; {jax.device_count()} available")
        env = {**os.environ, "MOEX_SHARDING_CHILD": "1",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={need}"}
        print(f"re-running on {need} virtual CPU devices (XLA_FLAGS)", file=sys.stderr)
        return subprocess.run([sys.executable, "-m", "moex.cli"] + bench_args(run),
                              env=env).returncode
    rows, ref = [], {}
    points = [(p, m) for p in run.presets for m in (None,) + run.meshes]
    for name, mesh in tqdm(points, desc="bench sharding"):
        row, logits = time_point(name, mesh, run)
        ref.setdefault(name, logits)                  # the one-device run comes first
        row["max_abs_logit_diff_vs_1_device"] = float(np.max(np.abs(logits - ref[name])))
        rows.append(row)
    vols = volume_rows()
    report = "\n\n".join([
        f"# Sharding: strategies, all-to-all volumes, step times ({jax.device_count()} "
        f"{jax.default_backend()} devices)",
        "## Strategies (moex.nn.sharding.STRATEGIES; a mesh with several axes takes the union)",
        strategies_md(),
        "## All-to-all volume per MoE layer, from shapes (bf16, expert axis of 4)",
        volumes_md(vols),
        f"## Step times, B = {run.batch}, T = the image's tokens + {run.seq_len} "
        f"(medians of {run.repeats}; on CPU a check, not a speed claim)",
        timing_md(rows)])
    print(report)
    path = write_outputs(run.out, rows, dataclasses.asdict(run), report,
                         extra=lambda tmp: write_csv(tmp / "volumes.csv", vols))
    print(f"\nwrote {path}")
    return 0


def bench_args(run: ShardingBenchConfig) -> list[str]:
    """The command line that runs `run` again (the subprocess on virtual devices)."""
    return (["bench", "sharding", "--presets", *run.presets, "--meshes", *run.meshes,
             "--batch", str(run.batch), "--seq-len", str(run.seq_len), "--warmup",
             str(run.warmup), "--repeats", str(run.repeats), "--out", run.out]
            + ([] if run.train else ["--no-train"]))
