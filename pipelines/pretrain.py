"""Pretrain a GPT-2: `accelerate launch pipelines/pretrain.py [RECIPE.yaml] [--key value ...]`."""

import sys

from lmpipe.cli import pretrain_command, run

if __name__ == "__main__":
    sys.exit(run(pretrain_command, sys.argv[1:]))
