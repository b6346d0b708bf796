"""Continue a prompt with a saved model, greedy or sampled, stopping at EOS:
`python pipelines/generate.py --model_name_or_path DIR --prompt "..." [--max_new_tokens N] [--do_sample | --greedy]
[--temperature T] [--top_k K] [--top_p P] [--seed S]`.
"""

import sys

from lmpipe.cli import run

if __name__ == "__main__":
    sys.exit(run("generate", sys.argv[1:], prog=sys.argv[0]))
