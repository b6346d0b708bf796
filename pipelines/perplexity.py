"""Perplexity of a saved model on a text file, as one JSON line:
`python pipelines/perplexity.py --model_name_or_path DIR --validation_file F [--block_size B] [--stride S]`.
"""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("perplexity", sys.argv[1:], prog=sys.argv[0]))
