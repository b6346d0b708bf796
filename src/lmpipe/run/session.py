"""The start of every training run (pretraining, QA and conversation fine-tuning), in fixed, named steps:

1. `check_run`: everything checkable before any data is read: every recipe value against `config.rules`
   (a recipe built in Python gets the command line's checks), the optimizer and schedule keys together, the
   launch, and the command's own `check`; then a lone CPU process started by `accelerate launch` gets back every
   core (`restore_cpu_threads`);
2. `check_hub_push`: the Hub target, when the recipe pushes (`run.hub`);
3. `hold_output_dir`: the output directory's lock and the full-disk guard, held until the run ends;
4. `check_output_dir`: another run's directory (unless overwriting) or a damaged named checkpoint is refused;
5. `finished_run`: a rerun of a finished run returns its metrics and trains nothing (a finished run whose final
   model fails verification is finished again from its newest checkpoint that verifies);
6. else the command's `train(checked, hub)`: data, model, Trainer, training (resumed from the newest complete
   checkpoint), outputs and push.

The command supplies `check` and `train`; this module never imports the Trainer code that `train` runs.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainingArguments

from lmpipe.config.recipe import Recipe
from lmpipe.config.rules import check_optimizer, check_training_length, check_values
from lmpipe.errors import LmpipeError
from lmpipe.run.checkpoints import checkpoint_problem, newest_complete_checkpoint, saved_model_problem
from lmpipe.run.disk_full import full_disk_is_one_line
from lmpipe.run.distributed import a_lost_rank_is_one_line, check_launch, restore_cpu_threads
from lmpipe.run.files import IDENTITY_NAME, METRICS_NAME, RESOLVED_RECIPE_NAME
from lmpipe.run.hub import HubTarget, check_hub_push
from lmpipe.run.identity import checkpoint_world_size, identity_changes
from lmpipe.run.lock import exclusive_output_dir

Checked = TypeVar("Checked")


def run_session(
    recipe: Recipe,
    check: Callable[[], Checked],
    train: Callable[[Checked, HubTarget | None], dict[str, Any]],
) -> dict[str, Any]:
    """Run the steps above; returns the run's metrics (those of the finished run when there was nothing to train)."""
    checked = check_run(recipe, check)
    restore_cpu_threads(recipe.training)
    hub = check_hub_push(recipe.training)  # before any data is loaded; None unless this process pushes
    with a_lost_rank_is_one_line(recipe.training), hold_output_dir(recipe.training):
        check_output_dir(recipe, recipe.training)
        return finished_run(recipe, recipe.training) or train(checked, hub)


def check_run(recipe: Recipe, check: Callable[[], Checked]) -> Checked:
    """Every recipe value, the optimizer and schedule keys, the launch, then the command's own checks (the loss
    check runs these too)."""
    check_values(*recipe.groups.values())
    check_training_length(recipe.training)
    check_optimizer(recipe.training, getattr(recipe.groups.get("lora"), "use_lora", False))
    check_launch(recipe.training)
    return check()


@contextlib.contextmanager
def hold_output_dir(training: TrainingArguments) -> Iterator[None]:
    """One run per output directory, and a full disk as one line, for as long as the run lasts."""
    with exclusive_output_dir(training), full_disk_is_one_line(training.output_dir, training.process_index == 0):
        yield


def check_output_dir(recipe: Recipe, args: TrainingArguments) -> None:
    """Before any data is loaded: refuse another run's output_dir (unless overwriting) or a damaged named checkpoint.

    A named checkpoint continues the run in `output_dir` when one is there, so that run's identity is checked too
    (the divergence advice names a checkpoint to resume from); an output_dir without one takes any checkpoint."""
    if args.resume_from_checkpoint:
        problem = checkpoint_problem(args.resume_from_checkpoint, args.save_only_model)
        if problem:
            raise LmpipeError(f"resume_from_checkpoint: {problem}")
        saved_by = checkpoint_world_size(args.resume_from_checkpoint)
        if saved_by not in (None, args.world_size):
            raise LmpipeError(
                f"resume_from_checkpoint: {args.resume_from_checkpoint} was saved by {saved_by} process(es), this run"
                f" has {args.world_size}: world_size may not change between resumes (it would skip or repeat data);"
                f" launch {saved_by} process(es)"
            )
        holds_a_run = any((Path(args.output_dir) / name).is_file() for name in (RESOLVED_RECIPE_NAME, IDENTITY_NAME))
        if not holds_a_run:
            return
    if getattr(args, "overwrite_output_dir", False):  # plain TrainingArguments have no such key: never overwrite
        return
    changes = identity_changes(recipe, args.output_dir)
    if changes:
        raise LmpipeError(
            f"{Path(args.output_dir) / RESOLVED_RECIPE_NAME}: output_dir holds another run ({'; '.join(changes)});"
            " use another output_dir, or set overwrite_output_dir: true to replace it"
        )


def finished_run(recipe: Recipe, args: TrainingArguments) -> dict[str, Any] | None:
    """The metrics of the finished run in `output_dir` when this command asks it for no more training, else None.

    Rerunning a finished run's command must not train: resuming from its last checkpoint, the Trainer would take
    one more step than `max_steps` (it checks the count only after a step). A larger `max_steps` or
    `num_train_epochs`, a named `resume_from_checkpoint` or another run's recipe is not finished here. Nor is a run
    whose final model fails verification (`saved_model_problem`): the rerun resumes from its newest checkpoint that
    verifies and finishes again (without a step when that checkpoint is the last); with none, it is refused.
    """
    path = Path(args.output_dir) / METRICS_NAME
    if args.resume_from_checkpoint or not path.is_file() or identity_changes(recipe, args.output_dir):
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if args.max_steps > 0:
        finished = metrics.get("train_steps", 0) >= args.max_steps
    else:
        finished = metrics.get("train_epochs", 0) >= args.num_train_epochs - 1e-6  # the Trainer's float epoch
    if not finished:
        return None
    problem = saved_model_problem(args.output_dir)
    if problem:
        checkpoint = newest_complete_checkpoint(args.output_dir, args.save_only_model)
        if checkpoint is None:
            raise LmpipeError(
                f"{problem}; no checkpoint of this run verifies to finish it again from: use another output_dir, or"
                f" remove {args.output_dir} to train it from the start"
            )
        if args.process_index == 0:
            print(f"{problem}: finishing the run again from {checkpoint}", file=sys.stderr)
        return None
    if args.process_index == 0:
        print(
            f"{args.output_dir} holds this run, finished after {metrics['train_steps']} steps: nothing to train."
            f" Its results are in {path}; raise --max_steps to train longer",
            file=sys.stderr,
        )
    return metrics
