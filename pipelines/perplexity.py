"""Perplexity of a saved model on a text file, as one JSON line:
`python pipelines/perplexity.py --model_name_or_path DIR --validation_file F [--block_size B] [--stride S]`.
"""

import sys

from lmpipe.cli import perplexity_command, run

if __name__ == "__main__":
    sys.exit(run(perplexity_command, sys.argv[1:]))
