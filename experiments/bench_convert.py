"""Conversion cost: checkpoints_convert vs transformers.from_pretrained (`moex bench convert`;
moex/experiments/convert_cost.py). Needs moex[convert] (torch, transformers).

    python experiments/bench_convert.py                      # ~1.6 GB fp32 Mixtral-shaped checkpoint
    python experiments/bench_convert.py --hidden 512 --layers 4   # smaller
    python experiments/bench_convert.py --arch qwen3-vl-moe --hidden 2048 --layers 6 \
        --experts 16 --ffn 768 --vision-depth 27   # ~6.9 GB fp32 Qwen3-VL-MoE-shaped
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench', 'convert'] + sys.argv[1:]))
