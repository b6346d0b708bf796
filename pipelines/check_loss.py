"""The loss check: `python pipelines/check_loss.py [RECIPE.yaml | --model_name_or_path DIR] [--batches N]`.

Exit 0 when the model's, a manual, F.cross_entropy's and the Trainer's losses agree; 1 naming the first that
does not; 2 for a mistake in the recipe or flags.
"""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("check-loss", sys.argv[1:], prog=sys.argv[0]))
