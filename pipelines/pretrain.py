"""Pretrain a GPT-2: `accelerate launch pipelines/pretrain.py [RECIPE.yaml] [--key value ...]`."""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("pretrain", sys.argv[1:], prog=sys.argv[0]))
