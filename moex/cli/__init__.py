"""The `moex` command. Every command lives in this package, one module per group:

    model.py        moex info | presets | generate | upcycle | convert | compare-hf
    lm.py           moex lm train | trace;  moex predictor train | eval | study
    vlm.py          moex vlm data | train | trace
    experiments.py  moex efficiency | compare;  moex bench offload | offload-hf | forward | convert

A group module has `register(subparsers)`; its commands read their options into the run's
dataclass (`moex.cli.args`) and call the library. No library module registers a command.
"""

from __future__ import annotations

import argparse
import sys

from moex.cli import experiments, lm, model, vlm

GROUPS = (model, lm, vlm, experiments)

USAGE = """commands:
  moex info PRESET [--json]               sizes from shapes: params, active params, bytes, KV bytes
  moex presets                            list the presets
  moex generate PRESET_OR_CHECKPOINT --prompt TEXT [--image FILE] [--offload POLICY]
  moex upcycle SRC OUT --to hard|soft     sparse upcycling of a dense moex checkpoint
  moex convert SRC OUT [--to-hf]          HF checkpoint <-> moex checkpoint (checkpoints_convert)
  moex compare-hf SRC [--prompts F]       a converted HF checkpoint against transformers
  moex lm train|trace ...                 byte-level LM on the stdlib corpus; routing traces
  moex predictor train|eval|study ...     the routing-path predictor (moex.predict)
  moex vlm data OUT | train PRESET | trace MODEL   synthetic data; train a VLM; its traces
  moex efficiency [...]                   the main experiment (= experiments/vlm_efficiency.py)
  moex compare [...]                      dense vs hard-MoE vs soft-MoE throughput and memory
  moex bench offload|offload-hf|forward|convert   offload grid; Mixtral forward; conversion cost
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
        return args.fn(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e   # KeyError's str quotes
        print(f"moex {args.command}: error: {why}", file=sys.stderr)
        return 2

