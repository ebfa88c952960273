"""Dense vs hard-MoE vs soft-MoE VLMs on CPU: prefill / decode tokens/s and memory per model.

    python experiments/compare_vlms.py                      # = `moex compare` (small presets)
    python experiments/compare_vlms.py --family tiny --batch 1 2 --seq 64

Results land in results/compare/ (results.csv, results.json, report.md).
"""

import argparse
import sys

from moex.bench import compare

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_arguments(parser)
    sys.exit(compare.main(parser.parse_args()))
