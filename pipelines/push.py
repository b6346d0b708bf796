"""Push a finished run folder to the Hub: `python pipelines/push.py OUTPUT_DIR [--hub_model_id ID] [--private]`."""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("push", sys.argv[1:], prog=sys.argv[0]))
