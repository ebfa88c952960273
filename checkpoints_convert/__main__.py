"""python -m checkpoints_convert SRC OUT [--dtype bf16|fp32]
python -m checkpoints_convert --to-hf MOEX_DIR OUT"""

from __future__ import annotations

import argparse
import sys

from checkpoints_convert.reader import CheckpointError
from checkpoints_convert.convert import convert
from checkpoints_convert.export import to_hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF model folder (or, with --to-hf, a moex checkpoint)")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="param dtype of the moex checkpoint (default: the source's)")
    p.add_argument("--to-hf", action="store_true", help="export a moex checkpoint to HF format")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if args.to_hf:
            out = to_hf(args.src, args.out)
        else:
            out = convert(args.src, args.out, args.dtype, progress=not args.quiet)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"checkpoints_convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
