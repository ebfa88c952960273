"""Sharding strategies, all-to-all volumes per MoE layer at the 7B presets' shapes, and step times
on a mesh against one device (`moex bench sharding`; moex/experiments/sharding_bench.py). On a
CPU it re-runs itself on 8 virtual devices (XLA_FLAGS).

    python experiments/bench_sharding.py
    python experiments/bench_sharding.py --presets small-hard --meshes expert=8 data=8
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench', 'sharding'] + sys.argv[1:]))
