"""Fine-tune on question-answer pairs: `accelerate launch pipelines/finetune_qa.py RECIPE.yaml [--key value ...]`."""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("finetune-qa", sys.argv[1:], prog=sys.argv[0]))
