"""Perplexity of a saved model on a text file, as one JSON line:
`python pipelines/evaluate.py --model_name_or_path DIR --validation_file F [--block_size B] [--stride S]`.
"""

import sys

from lmpipe.cli import evaluate_command, run

if __name__ == "__main__":
    sys.exit(run(evaluate_command, sys.argv[1:]))
