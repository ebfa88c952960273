"""Dense vs hard-MoE vs soft-MoE VLMs on CPU: prefill / decode tokens/s and memory per model
(`moex compare`; moex/experiments/throughput.py).

    python experiments/compare_vlms.py                      # small presets
    python experiments/compare_vlms.py --family tiny --batch 1 2 --seq 64
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['compare'] + sys.argv[1:]))
