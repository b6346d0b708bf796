"""`lmpipe <command>` and the pipelines/ scripts: parse, run one library function, print one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

from lmpipe.errors import LmpipeError
from lmpipe.recipe import REPO_RECIPES, parse_recipe

DEFAULT_PRETRAIN_RECIPE = REPO_RECIPES / "pretrain" / "default.yaml"


def pretrain_command(argv: list[str]) -> None:
    """Pretrain from a recipe (default: the tiny GPT-2 on Python's documentation text)."""
    from lmpipe.pretrain import pretrain

    default = str(DEFAULT_PRETRAIN_RECIPE) if DEFAULT_PRETRAIN_RECIPE.is_file() else None
    recipe = parse_recipe(argv, default_recipe=default)
    metrics = pretrain(recipe)
    training = recipe.arguments[-1]
    if training.process_index == 0:
        print(
            f"\neval loss {metrics['eval_loss']:.4f} nats/token over {metrics['eval_tokens']:,} tokens"
            f" | perplexity {metrics['perplexity']:.2f} (unigram baseline {metrics['unigram_perplexity']:.2f})"
            f" | {metrics['bits_per_byte']:.3f} bits/byte\nmodel saved to {training.output_dir}"
        )


COMMANDS: dict[str, Callable[[list[str]], None]] = {"pretrain": pretrain_command}


def run(command: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run a command; a user mistake becomes `error: ...` on stderr and exit code 2."""
    try:
        command(argv)
    except LmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: lmpipe {{{','.join(COMMANDS)}}} [RECIPE.yaml] [--key value ...]", file=sys.stderr)
        return 2
    return run(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
