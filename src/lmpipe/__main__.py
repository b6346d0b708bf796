"""`python -m lmpipe COMMAND ...`: the `lmpipe` console script without the script (and what `lmpipe launch` runs
when it is given a command name instead of a script path)."""

import sys

from lmpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
