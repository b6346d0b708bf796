"""`lmpipe evaluate MODEL --task T --data FILE`: load, build requests, score, write results and print the table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState

import lmpipe
from lmpipe.config.arguments import TokenizerArguments
from lmpipe.config.rules import check_values
from lmpipe.errors import LmpipeError
from lmpipe.model.build import load_pretrained
from lmpipe.model.checks import check_model_files, check_vocab
from lmpipe.model.tokenizer import load_tokenizer
from lmpipe.run.checkpoints import verified_model_dir
from lmpipe.zero_shot import tasks
from lmpipe.zero_shot.data import FORMATS, load_rows, task_rows
from lmpipe.zero_shot.report import write_outputs
from lmpipe.zero_shot.scoring import score_requests


@dataclass
class ZeroShotArguments:
    """Flags of `lmpipe evaluate MODEL ...` / `pipelines/evaluate_zero_shot.py`."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Saved model directory or Hub id."})
    task: str | None = field(default=None, metadata={"help": "What to score.", "choices": list(tasks.TASKS)})
    data: str | None = field(
        default=None, metadata={"help": "Local .jsonl/.json/.parquet/.csv (.txt for perplexity) or a Hub dataset id."}
    )
    split: str | None = field(default=None, metadata={"help": "Split of a Hub dataset (e.g. validation)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    data_format: str = field(
        default="auto",
        metadata={"help": "multiple_choice columns: native, or HellaSwag's, ARC's, PIQA's (auto: by the columns).",
                  "choices": list(FORMATS)},
    )
    text_column: str = field(default="text", metadata={"help": "Column of the text (lambada, perplexity)."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a .txt file splits into documents.", "choices": ["line", "paragraph", "document"]},
    )
    target_delimiter: str = field(default=" ", metadata={"help": "Put before every choice (the harness's default)."})
    output_dir: str | None = field(default=None, metadata={"help": "Write results.json and samples.jsonl here."})
    batch_size: int = field(default=16, metadata={"help": "Rows (a context with all its choices) per forward pass."})
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens the model sees at most (default: its n_positions)."}
    )
    stride: int | None = field(
        default=None, metadata={"help": "perplexity: tokens each rolling window predicts (default: max_length)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Score only the first N examples."})


def model_max_length(model, requested: int | None) -> int:
    """The harness's order: n_positions, max_position_embeddings, n_ctx; a smaller --max_length wins."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        limit = getattr(model.config, name, None)
        if limit:
            break
    else:
        limit = 2048
    if requested is None:
        return limit
    if not 2 <= requested <= limit:
        raise LmpipeError(f"max_length={requested} must be between 2 and the model's {limit} positions")
    return requested


def check_arguments(args: ZeroShotArguments) -> None:
    for name in ("model_name_or_path", "task", "data"):
        if not getattr(args, name):
            raise LmpipeError(f"--{name} is required" if name != "model_name_or_path" else "a MODEL is required")
    check_values(args)


def load_task_rows(args: ZeroShotArguments) -> tuple[list[dict], str]:
    """The task's rows (the first `limit`), adapted and checked one by one, and the data's sha256."""
    rows, sha256 = load_rows(args.data, args.split, args.dataset_config_name, args.sample_by)
    return task_rows(rows[: args.limit], args.task, args.data_format, args.text_column, args.data), sha256


def build_task(args: ZeroShotArguments, rows: list[dict], tokenizer, max_length: int) -> tasks.Task:
    """The rows as token requests for a model of `max_length` positions; a continuation too long is refused."""
    if args.stride is not None and args.stride > max_length:
        raise LmpipeError(f"stride={args.stride} must be between 1 and max_length={max_length}")
    if args.task == "multiple_choice":
        task = tasks.multiple_choice_task(rows, tokenizer, args.target_delimiter)
    elif args.task == "lambada":
        task = tasks.lambada_task(rows, tokenizer)
    else:
        task = tasks.perplexity_task(rows, tokenizer, max_length, args.stride)
    check_lengths(task, max_length, args.data)
    return task


def score_task(
    model, args: ZeroShotArguments, rows: list[dict], task: tasks.Task, max_length: int, progress: str | None = None
) -> tuple[dict[str, Any], list[dict]]:
    """Metrics and per-example samples of the model (in eval mode) on the task; on several ranks each scores its
    share of the batches and every rank gets all the scores. Training's evaluations call this too."""
    scores = score_requests(model, task.requests, max_length, args.batch_size, progress=progress)
    if args.task == "multiple_choice":
        return tasks.multiple_choice_results(rows, scores)
    if args.task == "lambada":
        return tasks.lambada_results(rows, scores)
    return tasks.perplexity_results(rows, task, scores)


def evaluate_zero_shot(args: ZeroShotArguments, show_progress: bool = True) -> dict[str, Any]:
    """Score the task; rank 0 writes the outputs. Returns results.json's content (on every rank). A saved model that
    fails verification is replaced by its newest checkpoint that passes, which the results then name."""
    check_arguments(args)
    args = dataclasses.replace(args, model_name_or_path=verified_model_dir(args.model_name_or_path))
    check_model_files(args.model_name_or_path, ("config", "weights", "tokenizer"))
    rows, sha256 = load_task_rows(args)
    tokenizer = load_tokenizer(TokenizerArguments(), args.model_name_or_path)
    model = load_pretrained(args.model_name_or_path).eval()
    check_vocab(model, tokenizer, allow_resize=False, name=args.model_name_or_path)
    max_length = model_max_length(model, args.max_length)
    # Without a GPU, ranks started by `accelerate launch` join one gloo group only when asked for the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    model.to(state.device)
    task = build_task(args, rows, tokenizer, max_length)
    progress = args.task if show_progress else None
    metrics, samples = score_task(model, args, rows, task, max_length, progress)
    results = {
        "task": args.task, "metrics": metrics, "n": len(rows), "model": args.model_name_or_path, "data": args.data,
        "data_sha256": sha256, "split": args.split, "data_format": args.data_format, "max_length": max_length,
        "batch_size": args.batch_size, "limit": args.limit, "lmpipe_version": lmpipe.__version__,
    }
    if args.task == "perplexity":
        results["stride"] = args.stride or max_length
    if args.output_dir and state.is_main_process:
        write_outputs(args.output_dir, results, samples)
    return results


def check_lengths(task: tasks.Task, max_length: int, source: str) -> None:
    """A continuation longer than the model's window cannot be scored (the harness asserts the same)."""
    for owner, request in zip(task.owners, task.requests):
        if not request.continuations or any(not c for c in request.continuations):
            raise LmpipeError(f"{source} row {owner + 1}: a choice or target tokenises to nothing")
        longest = max(map(len, request.continuations))
        if longest > max_length:
            raise LmpipeError(
                f"{source} row {owner + 1}: a continuation of {longest} tokens exceeds max_length={max_length}"
            )

