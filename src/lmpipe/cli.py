"""`lmpipe <command>` and the pipelines/ scripts: parse, run one library function, print one-line errors."""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmpipe.config.arguments import DPO_GROUPS, FINETUNE_QA_GROUPS, TASKS
from lmpipe.config.recipe import HelpRequested, parse_arguments, parse_recipe, read_recipe_file, recipe_task
from lmpipe.errors import LmpipeError
from lmpipe.run.files import RESOLVED_RECIPE_NAME

# Package data: any install has it.
DEFAULT_PRETRAIN_RECIPE = str(Path(__file__).parent / "config" / "default_recipe.yaml")
# Keys of a finished run's recipe.yaml that do not apply when its saved model and tokenizer are loaded back.
FROM_SCRATCH_KEYS = (
    "train_tokenizer", "tokenizer_vocab_size", "tokenizer_name_or_path", "vocab_file", "merges_file",
    "n_layer", "n_embd", "n_head", "n_positions", "pad_vocab_to_multiple_of", "activation_function",
)


def not_evaluated(metrics: dict) -> str:
    """The summary line of a run that asked for no final evaluation."""
    return f"no final evaluation (final_evaluation: false) | train loss {metrics['train_loss']:.4f}"


def zero_shot_summary(metrics: dict) -> str:
    """A line of the final evaluation's zero-shot scores (`acc`, or a perplexity task's token perplexity); empty
    without any."""
    parts = []
    for name, scores in metrics.get("zero_shot", {}).items():
        if "acc" in scores:
            chance = f" (chance {scores['chance']:.3f})" if "chance" in scores else ""
            parts.append(f"{name} acc {scores['acc']:.3f}{chance}")
        else:
            parts.append(f"{name} token perplexity {scores['token_perplexity']:.2f}")
    return "\nzero-shot: " + " | ".join(parts) if parts else ""


def pretrain_command(argv: list[str]) -> None:
    """Pretrain a GPT-2 from a recipe (default: the tiny GPT-2 on Python's documentation text)."""
    from lmpipe.pretrain import pretrain

    recipe = parse_recipe(argv, default_recipe=DEFAULT_PRETRAIN_RECIPE)
    metrics = pretrain(recipe)
    training = recipe.training
    if training.process_index != 0:
        return
    evaluated = (
        f"eval loss {metrics['eval_loss']:.4f} nats/token over {metrics['eval_tokens']:,} tokens"
        f" | perplexity {metrics['perplexity']:.2f} (unigram baseline {metrics['unigram_perplexity']:.2f})"
        f" | {metrics['bits_per_byte']:.3f} bits/byte"
    ) if "eval_loss" in metrics else not_evaluated(metrics)
    print(f"\n{evaluated}{zero_shot_summary(metrics)}\nmodel saved to {training.output_dir}")


def _pop_task(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--task T` / `--task=T` taken out of the arguments (it picks the recipe's dataclasses; it is no recipe key)."""
    rest, task, args = [], None, iter(argv)
    for arg in args:
        if arg == "--task":
            task = next(args, "")
        elif arg.startswith("--task="):
            task = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if task is not None and task not in TASKS:
        raise LmpipeError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return task, rest


def _run_directory_recipe(run_dir: str):
    """A finished run's recipe.yaml with its saved model (and tokenizer) in place of the from-scratch keys, and the
    flags it adds.

    A LoRA run's folder holds an adapter, not a model: its recipe is checked as written (base model + adapters). A
    DPO run's folder is the policy (a model or an adapter) and the model it started from is the reference.
    """
    path = Path(run_dir) / RESOLVED_RECIPE_NAME
    if not path.is_file():
        raise LmpipeError(f"{run_dir}: not an lmpipe run directory (no {RESOLVED_RECIPE_NAME})")
    if recipe_task(str(path)) == "dpo":
        started_from = read_recipe_file(str(path)).get("model_name_or_path")
        flags = ["--reference_model_name_or_path", started_from] if started_from else []
        return str(path), lambda recipe: {
            **{k: v for k, v in recipe.items() if k not in ("use_lora", "merge_lora")}, "model_name_or_path": run_dir
        }, flags

    def load_saved_model(recipe: dict) -> dict:
        if recipe.get("use_lora"):
            return recipe
        kept = {key: value for key, value in recipe.items() if key not in FROM_SCRATCH_KEYS}
        return {**kept, "model_name_or_path": run_dir}

    return str(path), load_saved_model, []


def check_loss_command(argv: list[str]) -> int:
    """Compare the model's, a manual, F.cross_entropy's and the Trainer's loss on the recipe's first batches; for a
    DPO recipe, TRL's DPO loss, rewards and log-probabilities with the same computed by hand.

    The argument is a recipe or a finished run's directory (its recipe.yaml and its saved model). The recipe's
    `task` key (which every run's recipe.yaml records) or `--task` says whether it is pretraining, QA
    fine-tuning or DPO; without either, pretraining. Without a recipe: the default one, or with
    `--model_name_or_path` the dataclass defaults (that model's tokenizer).
    """
    from lmpipe.loss_check import (
        LossCheckArguments,
        PreferenceCheck,
        format_preference_table,
        format_table,
        run_loss_check,
    )

    task, argv = _pop_task(argv)
    adjust = None
    if argv and not argv[0].startswith("-") and Path(argv[0]).is_dir():
        recipe_path, adjust, flags = _run_directory_recipe(argv[0])
        given = {arg.split("=", 1)[0] for arg in argv}
        argv = [recipe_path, *(flags if flags and flags[0] not in given else []), *argv[1:]]
    has_recipe = bool(argv) and not argv[0].startswith("-")
    loads_a_model = any(arg.split("=", 1)[0] == "--model_name_or_path" for arg in argv)
    default = None if loads_a_model else DEFAULT_PRETRAIN_RECIPE
    task = task or (recipe_task(argv[0]) if has_recipe and "--help" not in argv else None) or "pretrain"
    recipe = parse_recipe(
        argv, groups={**TASKS[task], "loss_check": LossCheckArguments}, default_recipe=default, adjust=adjust
    )
    check = run_loss_check(recipe)
    dpo = isinstance(check, PreferenceCheck)
    print(format_preference_table(check) if dpo else format_table(check))
    disagreement = check.first_disagreement()
    if disagreement:
        print(f"loss check failed: {disagreement}", file=sys.stderr)
        return 1
    if dpo:
        print(f"ok: TRL's DPO loss, rewards and log-probabilities agree with the manual ones within a relative "
              f"{check.relative_tolerance:.0e}")
        return 0
    print(
        f"ok: the five losses agree within a relative {check.relative_tolerance:.0e} (chunked: "
        f"{check.tolerance('chunked'):.0e}), the chunked gradients within {check.gradient_tolerance:.0e}"
    )
    return 0


def perplexity_command(argv: list[str]) -> None:
    """Rolling-window perplexity of a saved model on a text file (every token once), printed as one JSON line."""
    from lmpipe.zero_shot.perplexity import EvaluateArguments, evaluate_file

    print(json.dumps(evaluate_file(parse_arguments(argv, EvaluateArguments))))


def evaluate_command(argv: list[str]) -> None:
    """Zero-shot benchmark scores as lm-evaluation-harness computes them: `lmpipe evaluate MODEL --task T --data F`."""
    from accelerate import PartialState

    from lmpipe.zero_shot.report import format_table
    from lmpipe.zero_shot.run import ZeroShotArguments, evaluate_zero_shot

    if argv and not argv[0].startswith("-"):  # MODEL comes first, as in `lmpipe push OUTPUT_DIR`
        argv = ["--model_name_or_path", argv[0], *argv[1:]]
    args = parse_arguments(argv, ZeroShotArguments)
    results = evaluate_zero_shot(args)
    if PartialState().is_main_process:
        print(format_table(results))
        if args.output_dir:
            print(f"results written to {args.output_dir}/results.json and samples.jsonl")


def finetune_qa_command(argv: list[str]) -> None:
    """Fine-tune a pretrained model on question-answer pairs (full or LoRA); answer-only perplexity, EM and F1."""
    from lmpipe.finetune import finetune_qa

    recipe = parse_recipe(argv, groups=FINETUNE_QA_GROUPS)
    metrics = finetune_qa(recipe)
    training = recipe.training
    if training.process_index == 0:
        before = f", {metrics['initial_perplexity']:.2f} before" if "initial_perplexity" in metrics else ""
        rows = " | ".join(
            f"{name}: " + ", ".join(f"{v:,} {k}" for k, v in c.items()) for name, c in metrics["examples"].items()
        )
        scores = f" | exact match {metrics['exact_match']:.2f} | F1 {metrics['f1']:.2f}" if "f1" in metrics else ""
        evaluated = (
            f"answer-only eval loss {metrics['eval_loss']:.4f} nats/token over {metrics['eval_tokens']:,} tokens"
            f" | perplexity {metrics['perplexity']:.2f}{before}{scores}"
        ) if "eval_loss" in metrics else not_evaluated(metrics)
        print(
            f"\n{evaluated}{zero_shot_summary(metrics)}"
            f"\n{metrics['real_token_fraction']:.1%} of computed tokens are real ({metrics['batching']}) | {rows}"
            f"\nmodel saved to {metrics.get('merged_model_dir', training.output_dir)}"
        )


def dpo_command(argv: list[str]) -> None:
    """Tune a fine-tuned model (full or LoRA) on preference pairs with TRL's DPOTrainer; held-out DPO loss and
    reward accuracy."""
    from lmpipe.dpo import dpo

    recipe = parse_recipe(argv, groups=DPO_GROUPS)
    metrics = dpo(recipe)
    if recipe.training.process_index != 0:
        return
    rows = " | ".join(
        f"{name}: " + ", ".join(f"{v:,} {k}" for k, v in c.items()) for name, c in metrics["examples"].items()
    )
    evaluated = (
        f"held-out DPO loss {metrics['eval_loss']:.4f} | reward accuracy {metrics['eval_reward_accuracy']:.3f}"
        f" | reward margin {metrics['eval_reward_margin']:.4f} over {metrics['validation_pairs']:,} pairs"
    ) if "eval_loss" in metrics else not_evaluated(metrics)
    print(
        f"\n{evaluated}\npairs {rows}"
        f"\nmodel saved to {metrics.get('merged_model_dir', recipe.training.output_dir)}"
    )


def generate_command(argv: list[str]) -> None:
    """Print a saved model's continuation of `--prompt`, or its replies to `--chat` messages (greedy, or sampled
    with `--do_sample`)."""
    from lmpipe.generate import GenerateArguments, GenerationSettings, chat_from_pretrained, generate_from_pretrained

    groups = parse_recipe(argv, {"generate": GenerateArguments, "settings": GenerationSettings}, defaults={}).groups
    args, settings = groups["generate"], groups["settings"]
    if args.chat:
        for message in chat_from_pretrained(args, settings):
            print(f"{message['role']}: {message['content']}")
        return
    print(args.prompt + generate_from_pretrained(args, settings))


def show_data_command(argv: list[str]) -> None:
    """Print a recipe's first processed training examples with the learned tokens marked, and with `--jsonl`
    write their exact input_ids and labels (pretraining, QA or conversation recipes; no model is loaded).

    The task is the recipe's `task` key or `--task`, as for check-loss; without either, pretraining."""
    from lmpipe.show_data import ShowDataArguments, show_data

    task, argv = _pop_task(argv)
    has_recipe = bool(argv) and not argv[0].startswith("-")
    task = task or (recipe_task(argv[0]) if has_recipe and "--help" not in argv else None) or "pretrain"
    default = DEFAULT_PRETRAIN_RECIPE if task == "pretrain" else None
    show_data(parse_recipe(argv, groups={**TASKS[task], "show_data": ShowDataArguments}, default_recipe=default))


def push_command(argv: list[str]) -> None:
    """Push a finished run folder to the Hub (model, tokenizer, card, recipe, metrics; checkpoints if asked)."""
    from lmpipe.run.hub import PushArguments, push_output_dir

    if "-h" in argv or "--help" in argv:
        parse_arguments(argv, PushArguments)  # raises HelpRequested
    if not argv or argv[0].startswith("-"):
        raise LmpipeError(f"usage: lmpipe push {COMMANDS['push'].usage}")
    push_output_dir(argv[0], parse_arguments(argv[1:], PushArguments))


def launch_command(argv: list[str]) -> int:
    """`accelerate launch` that forwards SIGTERM, Ctrl-C and the other stop signals to the training processes and
    returns their exit code; the script may be a command's name (`lmpipe launch --num_processes 2 pretrain
    RECIPE`)."""
    from lmpipe.run.launch import launch_command as launch

    return launch(argv, commands=[name for name in COMMANDS if name != "launch"])


@dataclass(frozen=True)
class Command:
    """A command's function (returns its exit code, or None for 0) and its arguments as `usage:` shows them."""

    function: Callable[[list[str]], int | None]
    usage: str


COMMANDS = {
    "launch": Command(launch_command, "[accelerate launch options] COMMAND|SCRIPT [arguments ...]"),
    "pretrain": Command(pretrain_command, "[RECIPE.yaml] [--key value ...]"),
    "finetune-qa": Command(finetune_qa_command, "RECIPE.yaml [--key value ...]"),
    "dpo": Command(dpo_command, "RECIPE.yaml [--key value ...]"),
    "check-loss": Command(
        check_loss_command, "[RECIPE.yaml | RUN_DIR] [--task pretrain|qa|dpo] [--batches N] [--key value ...]"
    ),
    "perplexity": Command(perplexity_command, "--model_name_or_path DIR --validation_file FILE [--key value ...]"),
    "evaluate": Command(
        evaluate_command,
        "MODEL --task multiple_choice|lambada|perplexity --data FILE [--output_dir DIR] [--key value ...]",
    ),
    "push": Command(push_command, "OUTPUT_DIR [--hub_model_id ID] [--private] [--hub_strategy STRATEGY]"),
    "generate": Command(
        generate_command,
        "--model_name_or_path DIR (--prompt TEXT | --chat MESSAGE ... [--system TEXT]) [--key value ...]",
    ),
    "show-data": Command(
        show_data_command, "[RECIPE.yaml] [--task pretrain|qa|dpo] [--rows N] [--jsonl PATH] [--key value ...]"
    ),
}


def _summary(command: Command) -> str:
    """The first paragraph of the command's docstring, on one line."""
    return " ".join(inspect.getdoc(command.function).split("\n\n")[0].split())


def run(name: str, argv: list[str], prog: str | None = None) -> int:
    """Run a command; its own code (e.g. 1: a check failed), 0 after `--help`, or `error: ...` on stderr with the
    error's code (2 for a user mistake) — never a traceback for a mistake."""
    from lmpipe.run.launch import stop_with_launcher

    stop_with_launcher()
    command = COMMANDS[name]
    try:
        status = command.function(argv) or 0
    except HelpRequested as keys:
        print(f"usage: {prog or f'lmpipe {name}'} {command.usage}\n\n{inspect.getdoc(command.function)}\n\n{keys}")
        return 0
    except LmpipeError as e:
        if str(e):  # empty: said elsewhere (lmpipe launch names a rank that died, not each rank cut off from it)
            with contextlib.suppress(OSError):  # stderr gone with the terminal (SIGHUP): the exit code still says it
                print(f"error: {e}", file=sys.stderr)
        return e.exit_code  # 2; 3: a full disk or a finished run that failed to upload; 4: a lost rank; 128 + N
    from lmpipe.run.distributed import leave_process_group  # torch: not loaded for --help or a refusal

    leave_process_group()
    return status


def overview() -> str:
    """`lmpipe --help`: every command with its arguments and what it does."""
    lines = ["usage: lmpipe COMMAND [arguments]   (lmpipe COMMAND --help lists a command's recipe keys)", ""]
    for name, command in COMMANDS.items():
        lines += [f"  {name} {command.usage}", f"      {_summary(command)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(overview(), file=sys.stderr)
        return 2
    return run(argv[0], argv[1:])
