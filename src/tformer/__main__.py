"""`python -m tformer ...`: the `tformer` command (what `torchrun -m tformer train ...` runs)."""

import sys

from tformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
