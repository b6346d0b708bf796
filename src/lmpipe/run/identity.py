"""A run's identity: what must match for a rerun of a command to continue the run already in its output directory.

One table for resume, the finished-run check and the Hub push: every recipe group but `TrainingArguments`, and the
seeds. Schedule, optimiser and logging may change between resumes (a longer run, a lower learning rate after a loss
spike), as the Trainer allows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from transformers import TrainingArguments
from transformers.trainer_utils import sort_checkpoints

from lmpipe.config.recipe import TASK_KEY, Recipe
from lmpipe.run.files import RESOLVED_RECIPE_NAME

IDENTITY_TRAINING_KEYS = ("seed", "data_seed")
NOT_IDENTITY_KEYS = {"preprocessing_num_workers", "generation_max_new_tokens", "merge_lora"}


def identity_changes(recipe: Recipe, output_dir: str) -> list[str]:
    """How this recipe differs from the run already in `output_dir` (empty: the same run, or no run there).

    Compares the written `recipe.yaml` key by key (absent keys take the dataclass default) without parsing it:
    building a second `TrainingArguments` would reset the process's Accelerate state under a live Trainer.
    """
    previous = Path(output_dir) / RESOLVED_RECIPE_NAME
    if not previous.is_file():
        has_checkpoints = Path(output_dir).is_dir() and sort_checkpoints(output_dir)
        return [f"checkpoints but no {RESOLVED_RECIPE_NAME}"] if has_checkpoints else []
    try:
        before = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"an unreadable {RESOLVED_RECIPE_NAME} ({type(e).__name__})"]
    if not isinstance(before, dict):
        return [f"a {RESOLVED_RECIPE_NAME} that is not a mapping"]
    fields = {f.name: (group, f) for group in recipe.groups.values() for f in dataclasses.fields(group) if f.init}
    foreign = sorted(key for key in before if key not in fields and key != TASK_KEY)
    changes = [f"keys of another command: {', '.join(foreign)}"] if foreign else []
    if before.get(TASK_KEY, recipe.task) != recipe.task:
        changes.append(f"{TASK_KEY} {before[TASK_KEY]!r} -> {recipe.task!r}")
    for name, (group, field) in fields.items():
        is_training = isinstance(group, TrainingArguments)
        if name in NOT_IDENTITY_KEYS or (is_training and name not in IDENTITY_TRAINING_KEYS):
            continue
        old, new = before.get(name, _default(field)), getattr(group, name)
        if old != new:
            changes.append(f"{name} {old!r} -> {new!r}")
    return changes


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default
