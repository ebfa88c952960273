"""python -m checkpoints_convert SRC OUT [--dtype bf16|fp32]     (= moex convert)
python -m checkpoints_convert --to-hf MOEX_DIR OUT"""

import sys

from moex.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
