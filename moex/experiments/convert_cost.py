"""Conversion cost: `checkpoints_convert` vs `transformers.from_pretrained` + state dict to numpy.

    python experiments/bench_convert.py                      # = moex bench convert; ~1.6 GB fp32 Mixtral-shaped checkpoint
    python experiments/bench_convert.py --hidden 512 --layers 4   # smaller

Generates a random Mixtral-shaped HF checkpoint (sharded safetensors, per-expert hub layout), then
runs each contender in its own child process and reports wall time and the child's peak RSS
(`os.wait4` rusage). The baseline and moex are measured in the same run, alternating, `--repeats`
times each; medians are reported. Writes results.json and report.md under --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

HF_CHILD = """
import sys, numpy as np, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
print(sum(a.nbytes for a in arrays.values()))
"""


def make_checkpoint(path: pathlib.Path, hidden: int, layers: int, experts: int, ffn: int) -> int:
    import torch
    import transformers
    cfg = transformers.MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn,
                                     num_hidden_layers=layers, num_attention_heads=16,
                                     num_key_value_heads=4, num_local_experts=experts,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="400MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{argv} exited with status {status}")
    return wall, usage.ru_maxrss / 1024, out     # ru_maxrss is in KB on Linux


@dataclasses.dataclass(frozen=True)
class ConvertCostConfig:
    hidden: int = 1024
    layers: int = 8
    experts: int = 8
    ffn: int = 2048
    repeats: int = 3
    out: str = "results/bench_convert"


def main(args: ConvertCostConfig) -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="moex-bench-convert-"))
    try:
        src = work / "hf"
        size = make_checkpoint(src, args.hidden, args.layers, args.experts, args.ffn)
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards")
        runs = {"moex checkpoints_convert": [], "transformers from_pretrained + numpy": []}
        for i in tqdm(range(args.repeats), desc="repeats"):
            out = work / f"moex-{i}"
            runs["moex checkpoints_convert"].append(run_child(
                [sys.executable, "-m", "checkpoints_convert", str(src), str(out), "--dtype",
                 "fp32", "--quiet"])[:2])
            shutil.rmtree(out)
            runs["transformers from_pretrained + numpy"].append(
                run_child([sys.executable, "-c", HF_CHILD, str(src)])[:2])
        rows = [{"contender": name, "wall_s_median": statistics.median(w for w, _ in r),
                 "wall_s_min": min(w for w, _ in r), "wall_s_max": max(w for w, _ in r),
                 "peak_rss_mb_median": statistics.median(m for _, m in r)}
                for name, r in runs.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| contender | wall s (median, min-max) | peak RSS MB |", "|---|---|---|"]
    table += [f"| {r['contender']} | {r['wall_s_median']:.1f} ({r['wall_s_min']:.1f}-"
              f"{r['wall_s_max']:.1f}) | {r['peak_rss_mb_median']:.0f} |" for r in rows]
    report = (f"checkpoint {size / 1e6:.0f} MB (fp32, Mixtral-shaped, hidden {args.hidden}, "
              f"{args.layers} layers, {args.experts} experts x {args.ffn})\n\n" + "\n".join(table))
    print(report)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"checkpoint_bytes": size, "args": dataclasses.asdict(args),
                                                  "rows": rows}, indent=2))
    (out / "report.md").write_text(report + "\n")
    return 0

