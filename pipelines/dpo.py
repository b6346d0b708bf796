"""Preference tuning (DPO): `accelerate launch pipelines/dpo.py RECIPE.yaml [--key value ...]`."""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("dpo", sys.argv[1:], prog=sys.argv[0]))
