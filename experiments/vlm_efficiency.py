"""The main job: dense vs hard-MoE vs soft-MoE VLMs -- throughput, memory, accuracy and expert
offloading across batch sizes and sequence lengths (`moex efficiency`; moex/experiments/efficiency.py).

    python experiments/vlm_efficiency.py                      # mini (trained) + small (grid), CPU
    python experiments/vlm_efficiency.py --grid full          # batch 1..32 x seq 256..2048
    python experiments/vlm_efficiency.py --checkpoint ckpt/llava-1.5-7b \\
        --tokenizer hf/llava-1.5-7b-hf/tokenizer.json --template "USER: {prompt} ASSISTANT:" \\
        --style mmbench --mmbench MMBench_DEV_EN.tsv --seed-json SEED-Bench.json \\
        --seed-images SEED-Bench-image --out results/vlm_efficiency_llava
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['efficiency'] + sys.argv[1:]))
