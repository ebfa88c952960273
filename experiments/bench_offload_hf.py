"""The offload grid on a converted random transformers Mixtral (`moex bench offload-hf`;
moex/experiments/offload_hf.py). Needs moex[convert] (torch, transformers).

    python experiments/bench_offload_hf.py
    python experiments/bench_offload_hf.py --layers 4 --experts 8 --budgets 50% 25% --repeats 3
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench', 'offload-hf'] + sys.argv[1:]))
