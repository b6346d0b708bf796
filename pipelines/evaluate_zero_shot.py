"""Zero-shot benchmark scores, as lm-evaluation-harness computes them (several ranks under `accelerate launch`):
`accelerate launch pipelines/evaluate_zero_shot.py MODEL --task multiple_choice|lambada|perplexity --data FILE`.
"""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], prog=sys.argv[0]))
