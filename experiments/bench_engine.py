"""The offload engine's decode speed against the whole-model jitted decode, with a per-layer
breakdown (`moex bench engine`; moex/experiments/engine_speed.py).

    python experiments/bench_engine.py
    python experiments/bench_engine.py --checkpoint results/offload_hf/moex --batch 1 4
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench', 'engine'] + sys.argv[1:]))
