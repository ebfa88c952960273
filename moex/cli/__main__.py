"""python -m moex.cli ... (the same as the `moex` command)."""

import sys

from moex.cli import main

sys.exit(main())
