"""Zero-shot tasks scored at every evaluation of a training run (recipe `zero_shot_tasks`), exactly as `lmpipe evaluate`
scores them: the same rows, token requests and scoring code (`zero_shot.run`), on the model as it is at that step.

Several ranks: each scores every n-th batch and every rank gets all the scores (`zero_shot.scoring.score_requests`,
as `lmpipe evaluate` does under `lmpipe launch`), so every rank logs the single rank's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainingArguments

from lmpipe.config.rules import check_values
from lmpipe.errors import LmpipeError
from lmpipe.zero_shot.run import ZeroShotArguments, build_task, load_task_rows, model_max_length, score_task
from lmpipe.zero_shot.tasks import Task

# An entry takes `lmpipe evaluate`'s flags but the model (the run's own) and the output directory (the run's logs).
FLAG_KEYS = tuple(f.name for f in dataclasses.fields(ZeroShotArguments) if f.name not in ("model_name_or_path",
                                                                                       "output_dir"))
KEYS = ("name", *FLAG_KEYS)
NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A task's metric in the logs: eval_zero_shot/NAME/METRIC (TensorBoard: eval/zero_shot/NAME/METRIC).
PREFIX = "zero_shot"


@dataclass
class ZeroShotTask:
    """One entry of `zero_shot_tasks`: its name in the logs, its `lmpipe evaluate` arguments and checked rows, and
    (once the model is known) its token requests."""

    name: str
    args: ZeroShotArguments
    rows: list[dict]
    task: Task | None = None
    max_length: int = 0


def _entry_arguments(entry: dict) -> ZeroShotArguments:
    """The entry's flags as ZeroShotArguments, each value of its flag's type and among its choices."""
    for field in dataclasses.fields(ZeroShotArguments):
        if field.name not in entry:
            continue
        value, wants_int = entry[field.name], "int" in str(field.type)
        if wants_int and (isinstance(value, bool) or not isinstance(value, int)):
            raise LmpipeError(f"{field.name} must be an integer, got {value!r}")
        if not wants_int and not isinstance(value, str):
            raise LmpipeError(f"{field.name} must be text, got {value!r}")
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise LmpipeError(f"{field.name} must be one of {', '.join(choices)}, got {value!r}")
    for required in ("task", "data"):
        if not entry.get(required):
            raise LmpipeError(f"needs a {required} (as `lmpipe evaluate --{required}`)")
    args = ZeroShotArguments(**entry)
    check_values(args)
    return args


def parse_zero_shot_tasks(values: list[Any] | None) -> list[ZeroShotTask]:
    """The recipe's entries (mappings, or their JSON text from the command line), each checked and its rows loaded
    and checked; a mistake is one line naming `zero_shot_tasks[N]`."""
    parsed: list[ZeroShotTask] = []
    for number, value in enumerate(values or [], start=1):
        where = f"zero_shot_tasks[{number}]"
        try:
            entry = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise LmpipeError(f"{where}: a task is a mapping of task, data and other `lmpipe evaluate` flags, "
                              f"got {value!r}")
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise LmpipeError(f"{where}: unknown key '{unknown[0]}'; keys are {', '.join(KEYS)}")
        entry = dict(entry)
        name = entry.pop("name", None)
        try:
            args = _entry_arguments(entry)
            name = Path(args.data).stem if name is None else name
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise LmpipeError(f"name must be letters, digits, '_', '.' or '-', got {name!r}")
            taken = next((other.name for other in parsed if other.name == name), None)
            if taken:
                raise LmpipeError(f"name '{name}' is already another task's; give each task its own name")
            rows, _ = load_task_rows(args)
        except LmpipeError as error:
            raise LmpipeError(f"{where}: {error}") from None
        parsed.append(ZeroShotTask(name, args, rows))
    return parsed


def check_zero_shot_tasks(training: TrainingArguments) -> None:
    """Before any data of the run: every entry and its rows; FSDP and DeepSpeed are refused, since scoring runs the
    unwrapped model on each rank, whose weights those would have sharded."""
    values = getattr(training, "zero_shot_tasks", None)
    if not values:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or training.fsdp or training.deepspeed:
        raise LmpipeError("zero_shot_tasks: not with FSDP or DeepSpeed (the weights are sharded across ranks); "
                          "score the saved model with `lmpipe evaluate` instead")
    parse_zero_shot_tasks(values)


def prepare_zero_shot_tasks(
    values: list[Any] | None, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> list[ZeroShotTask]:
    """The entries with their token requests for this model and tokenizer, built once for the whole run."""
    prepared = parse_zero_shot_tasks(values)
    for task in prepared:
        task.max_length = model_max_length(model, task.args.max_length)
        try:
            task.task = build_task(task.args, task.rows, tokenizer, task.max_length)
        except LmpipeError as error:
            raise LmpipeError(f"zero_shot_tasks ({task.name}): {error}") from None
    return prepared


def score_zero_shot_tasks(model: torch.nn.Module, tasks: list[ZeroShotTask]) -> dict[str, float]:
    """Every task's metrics, `zero_shot/NAME/METRIC`, from the model in eval mode (dropout off, as `lmpipe evaluate`
    loads it); its mode is restored. A peft model is scored through its base model, adapters active."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = lm.training
    lm.eval()
    metrics: dict[str, float] = {}
    try:
        for task in tasks:
            scores, _ = score_task(lm, task.args, task.rows, task.task, task.max_length)
            metrics.update({f"{PREFIX}/{task.name}/{key}": value for key, value in scores.items()})
    finally:
        lm.train(was_training)
    return metrics


def zero_shot_metrics(evaluation: dict[str, Any], prefix: str = "eval") -> dict[str, dict[str, float | None]]:
    """An evaluation's zero-shot scores as {name: {metric: value}} (metrics.json; a non-finite value, such as the
    standard error of a single example, is null)."""
    start = f"{prefix}_{PREFIX}/"
    nested: dict[str, dict[str, float | None]] = {}
    for key, value in evaluation.items():
        if key.startswith(start):
            name, metric = key[len(start):].split("/", 1)
            finite = not isinstance(value, float) or math.isfinite(value)
            nested.setdefault(name, {})[metric] = value if finite else None
    return nested
