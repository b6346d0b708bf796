"""Fine-tune on question-answer pairs: `accelerate launch pipelines/finetune_qa.py RECIPE.yaml [--key value ...]`."""

import sys
from pathlib import Path

# Python puts this folder first on sys.path, where pipelines/evaluate.py would shadow the `evaluate` library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lmpipe.cli import finetune_qa_command, run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(finetune_qa_command, sys.argv[1:]))
