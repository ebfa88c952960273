"""Quality of quantized experts against full precision: logit difference, synthetic MMBench /
SEED dev accuracy of the trained hard-MoE VLM and held-out loss of the stdlib LM, at int8, int4
and mixed (`moex bench quant`; moex/experiments/quant_quality.py).

    python experiments/quant_quality.py              # runs/vlm/mini-hard, runs/lm/small-hard
    python experiments/quant_quality.py --formats int8 int4:32 mixed --mixed-keep 0.5 \\
        --questions 0 --out results/quant_quality_all
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench', 'quant'] + sys.argv[1:]))
