"""The `moex` command. Every command lives in this package, one module per group:

    model.py        moex info | presets | generate | upcycle | convert | compare-hf | make-tiny-hf
    lm.py           moex lm train | trace;  moex predictor train | eval | study
    vlm.py          moex vlm data | train | trace
    experiments.py  moex efficiency | compare | gpu-check;  moex bench offload | offload-hf | forward | convert
    perf.py         moex perf PRESET | calibrate | validate | offload | hardware

A group module has `register(subparsers)`; its commands read their options into the run's
dataclass (`moex.cli.args`) and call the library. No library module registers a command.
"""

from __future__ import annotations

import argparse
import os
import sys

from moex.cli import experiments, lm, model, perf, vlm
from moex.nn import sharding

GROUPS = (model, lm, vlm, experiments, perf)

USAGE = """commands:
  moex info PRESET [--json]               sizes from shapes: params, active params, bytes, KV bytes
  moex presets                            list the presets
  moex generate PRESET_OR_CHECKPOINT --prompt TEXT [--image FILE] [--offload POLICY]
  moex upcycle SRC OUT --to hard|soft     sparse upcycling of a dense moex checkpoint
  moex convert SRC OUT [--to-hf]          HF checkpoint <-> moex checkpoint (checkpoints_convert)
  moex compare-hf SRC [--prompts F]       a converted HF checkpoint against transformers
  moex make-tiny-hf qwen3-vl|qwen3-vl-moe OUT   a tiny random transformers Qwen3-VL (demos)
  moex lm train|trace ...                 byte-level LM on the stdlib corpus; routing traces
  moex predictor train|eval|study ...     the routing-path predictor (moex.predict)
  moex vlm data OUT | train PRESET | trace MODEL   synthetic data; train a VLM; its traces
  moex efficiency [...]                   the main experiment (= experiments/vlm_efficiency.py)
  moex compare [...]                      dense vs hard-MoE vs soft-MoE throughput and memory
  moex gpu-check [--tiny]                 7B grid + offload beside the model (experiments/gpu_check.py)
  moex bench offload|offload-hf|forward|convert   offload grid; Mixtral forward; conversion cost
  moex perf PRESET --hardware h200 --batch B --seq T   roofline table from the performance model
  moex perf calibrate|validate|offload|hardware    calibrate on this CPU; check; project offload
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moex", description=__doc__, epilog=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        sharding.initialize_distributed(os.environ)     # multi-host runs (README: Choosing a mesh)
        return args.fn(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e   # KeyError's str quotes
        print(f"moex {args.command}: error: {why}", file=sys.stderr)
        return 2

