"""Forward tokens/s of a Mixtral-shaped decoder LM on CPU: moex vs transformers' MixtralForCausalLM
(`moex bench forward`; moex/experiments/moe_forward.py). Needs moex[convert] (torch, transformers).

    python experiments/bench_moe_forward.py
    python experiments/bench_moe_forward.py --batch 1 --seq 128 --repeats 3 --out results/quick
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench', 'forward'] + sys.argv[1:]))
