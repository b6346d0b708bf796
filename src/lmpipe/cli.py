"""`lmpipe <command>` and the pipelines/ scripts: parse, run one library function, print one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from lmpipe.errors import LmpipeError
from lmpipe.recipe import REPO_RECIPES, parse_recipe

DEFAULT_PRETRAIN_RECIPE = REPO_RECIPES / "pretrain" / "default.yaml"


def default_pretrain_recipe() -> str | None:
    return str(DEFAULT_PRETRAIN_RECIPE) if DEFAULT_PRETRAIN_RECIPE.is_file() else None


def pretrain_command(argv: list[str]) -> None:
    """Pretrain from a recipe (default: the tiny GPT-2 on Python's documentation text)."""
    from lmpipe.pretrain import pretrain

    recipe = parse_recipe(argv, default_recipe=default_pretrain_recipe())
    metrics = pretrain(recipe)
    training = recipe.arguments[-1]
    if training.process_index == 0:
        print(
            f"\neval loss {metrics['eval_loss']:.4f} nats/token over {metrics['eval_tokens']:,} tokens"
            f" | perplexity {metrics['perplexity']:.2f} (unigram baseline {metrics['unigram_perplexity']:.2f})"
            f" | {metrics['bits_per_byte']:.3f} bits/byte\nmodel saved to {training.output_dir}"
        )


def check_loss_command(argv: list[str]) -> int:
    """Compare the model's, a manual, F.cross_entropy's and the Trainer's loss on the recipe's batches.

    A recipe with QA keys (question_column, max_length, use_lora, ...) is checked as QA fine-tuning. Without a
    recipe: the default one, or with `--model_name_or_path` the dataclass defaults (its tokenizer).
    """
    from lmpipe.loss_check import LossCheckArguments, format_table, run_loss_check
    from lmpipe.recipe import FINETUNE_QA_ARGUMENTS, PRETRAIN_ARGUMENTS, is_qa_recipe

    loads_a_model = any(arg.split("=", 1)[0] == "--model_name_or_path" for arg in argv)
    default = None if loads_a_model else default_pretrain_recipe()
    types = FINETUNE_QA_ARGUMENTS if is_qa_recipe(argv) else PRETRAIN_ARGUMENTS
    recipe = parse_recipe(argv, types=(*types, LossCheckArguments), default_recipe=default)
    check = run_loss_check(recipe)
    print(format_table(check))
    disagreement = check.first_disagreement()
    if disagreement:
        print(f"loss check failed: {disagreement}", file=sys.stderr)
        return 1
    print(f"ok: the four losses agree within a relative {check.relative_tolerance:.0e}")
    return 0


def perplexity_command(argv: list[str]) -> None:
    """Exact perplexity of a saved model on a text file, printed as one JSON line."""
    from lmpipe.evaluation import EvaluateArguments, evaluate_file

    (args,) = parse_recipe(argv, types=(EvaluateArguments,), defaults={}).arguments
    print(json.dumps(evaluate_file(args)))


def finetune_qa_command(argv: list[str]) -> None:
    """Fine-tune a pretrained model on question-answer pairs (full or LoRA); answer-only perplexity, EM and F1."""
    from lmpipe.finetune import finetune_qa
    from lmpipe.recipe import FINETUNE_QA_ARGUMENTS

    recipe = parse_recipe(argv, types=FINETUNE_QA_ARGUMENTS)
    metrics = finetune_qa(recipe)
    training = recipe.arguments[-1]
    if training.process_index == 0:
        before = f", {metrics['initial_perplexity']:.2f} before" if "initial_perplexity" in metrics else ""
        rows = " | ".join(f"{name}: " + ", ".join(f"{v:,} {k}" for k, v in c.items()) for name, c in metrics["examples"].items())
        print(
            f"\nanswer-only eval loss {metrics['eval_loss']:.4f} nats/token over {metrics['eval_tokens']:,} tokens"
            f" | perplexity {metrics['perplexity']:.2f}{before}"
            f" | exact match {metrics['exact_match']:.2f} | F1 {metrics['f1']:.2f}"
            f"\n{metrics['real_token_fraction']:.1%} of computed tokens are real ({metrics['batching']}) | {rows}"
            f"\nmodel saved to {metrics.get('merged_model_dir', training.output_dir)}"
        )


def generate_command(argv: list[str]) -> None:
    """Print a saved model's continuation of `--prompt` (greedy, or sampled with `--do_sample`)."""
    from lmpipe.generate import GenerateArguments, GenerationSettings, generate_from_pretrained

    args, settings = parse_recipe(argv, types=(GenerateArguments, GenerationSettings), defaults={}).arguments
    print(args.prompt + generate_from_pretrained(args, settings))


def push_command(argv: list[str]) -> None:
    """Push a finished run folder to the Hub: `lmpipe push OUTPUT_DIR [--hub_model_id ID] [--private]`."""
    from lmpipe.hub import PushArguments, push_output_dir

    if not argv or argv[0].startswith("-"):
        raise LmpipeError("usage: lmpipe push OUTPUT_DIR [--hub_model_id ID] [--private] [--hub_strategy STRATEGY]")
    (args,) = parse_recipe(argv[1:], types=(PushArguments,), defaults={}).arguments
    push_output_dir(argv[0], args)


COMMANDS: dict[str, Callable[[list[str]], int | None]] = {
    "pretrain": pretrain_command,
    "finetune-qa": finetune_qa_command,
    "check-loss": check_loss_command,
    "perplexity": perplexity_command,
    "push": push_command,
    "generate": generate_command,
}


def run(command: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run a command; its own code (e.g. 1: a check failed), or 2 with `error: ...` on stderr for a user mistake."""
    try:
        return command(argv) or 0
    except LmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code  # 2; 3 when a finished run failed to upload (lmpipe.hub.HubPushError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: lmpipe {{{','.join(COMMANDS)}}} [RECIPE.yaml] [--key value ...]", file=sys.stderr)
        return 2
    return run(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
