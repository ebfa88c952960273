"""The routing-path predictor study, end to end (`moex predictor study`;
moex/experiments/routing_predictor.py says what each step does).

    python experiments/routing_predictor.py
    python experiments/routing_predictor.py --lm-steps 100 --requests 32 --predictor-steps 300
"""

import sys

from moex.cli import main

if __name__ == "__main__":
    sys.exit(main(['predictor', 'study'] + sys.argv[1:]))
