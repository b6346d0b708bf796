"""Fine-tune on question-answer pairs: `accelerate launch pipelines/finetune_qa.py RECIPE.yaml [--key value ...]`."""

import sys

from lmpipe.cli import finetune_qa_command, run

if __name__ == "__main__":
    sys.exit(run(finetune_qa_command, sys.argv[1:]))
