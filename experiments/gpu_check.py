"""The GPU check (moex/experiments/gpu_check.py): the 7B-class efficiency grid and a
Mixtral-shaped offload bench, each measurement beside the performance model's prediction.
Finishes within 8 minutes on one H200.

    python experiments/gpu_check.py                 # on the GPU machine
    python experiments/gpu_check.py --tiny          # CPU smoke test (tiny presets)
    python experiments/gpu_check.py --hardware h100 --layers 4
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['gpu-check'] + sys.argv[1:]))
