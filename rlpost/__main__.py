"""`python -m rlpost ...` is `rlpost ...`."""

import sys

from rlpost.cli import main

if __name__ == "__main__":
    sys.exit(main())
