"""Resuming: which `checkpoint-N` of an output directory a run may continue from, and whose run the directory holds.

The Trainer writes `checkpoint-N/` in place, file by file, and silently skips a missing optimizer, scheduler or
RNG file on resume; a kill or a full disk can leave a torn checkpoint. We verify a checkpoint before resuming
rather than save atomically: verification also catches files damaged after they were written and checkpoints
from any writer, and needs no override of the Trainer's private save path (transformers itself tried a temporary
directory + rename, huggingface/transformers#27820, and dropped it after multi-node problems, #28364 and #36112).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import yaml
from safetensors import safe_open
from transformers import TrainingArguments
from transformers.trainer_utils import sort_checkpoints

from lmpipe.errors import LmpipeError, where_relative
from lmpipe.model.finite import file_non_finite
from lmpipe.config.recipe import TASK_KEY, Recipe
from lmpipe.run.files import RESOLVED_RECIPE_NAME

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
STEP = re.compile(r"checkpoint-(\d+)$")
# Identity of a run: every recipe group but TrainingArguments, and its seeds. Schedule, optimiser and logging
# may change between resumes (a longer run, a lower learning rate after a loss spike), as the Trainer allows.
IDENTITY_TRAINING_KEYS = ("seed", "data_seed")
NOT_IDENTITY_KEYS = {"preprocessing_num_workers", "generation_max_new_tokens", "merge_lora"}
# What a checkpoint needs, as (what, test on a file name); the training state unless `save_only_model`.
NEEDS_WEIGHTS = (
    "model weights (*.safetensors)", lambda n: n.endswith(".safetensors") or n.startswith("pytorch_model_fsdp")
)
NEEDS_TRAINING_STATE = [
    ("optimizer state", lambda n: n.startswith(("optimizer", "global_step"))),  # global_step*: DeepSpeed's
    ("scheduler.pt", lambda n: n == "scheduler.pt"),
    ("rng_state*.pth", lambda n: n.startswith("rng_state")),
]


def checkpoint_problem(checkpoint: str | Path, save_only_model: bool = False) -> str | None:
    """Why `checkpoint` cannot be resumed from exactly, naming the file; None when it is complete and finite.

    First headers and checksums: safetensors headers, the CRC-32 of every record of torch's zip files, and the
    JSON files. Then the values: weights and optimizer state, read with torch's weights-only loader (tensors and
    plain containers only: a pickle that would call anything else is refused, never run), must hold no NaN or
    inf, or resuming would only repeat the divergence.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return f"{path}: not a checkpoint directory{where_relative(str(checkpoint)) if not path.exists() else ''}"
    names = {p.name for p in path.iterdir()}
    state = path / TRAINER_STATE
    if TRAINER_STATE not in names:
        return f"{state}: missing (the checkpoint was not finished)"
    for what, matches in [NEEDS_WEIGHTS, *([] if save_only_model else NEEDS_TRAINING_STATE)]:
        if not any(matches(name) for name in names):
            return f"{path}: no {what}"
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        problem = _file_problem(file)
        if problem:
            return f"{file}: {problem}"
    step = STEP.search(path.name)
    recorded = json.loads(state.read_text(encoding="utf-8"))
    recorded = recorded.get("global_step") if isinstance(recorded, dict) else recorded
    if step and int(step.group(1)) != recorded:
        return f"{state}: records step {recorded}, not {step.group(1)}"
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            poisoned = file_non_finite(file)
        except pickle.UnpicklingError as e:  # torch's weights-only loader refuses, and runs, nothing else
            return f"{file}: not loadable with weights_only ({_unpickler_reason(e)})"
        if poisoned:
            return f"{file}: {poisoned} (a diverged run's checkpoint)"
    return None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The one sentence of torch's long weights-only refusal that says what it found."""
    reason = next((line for line in str(error).splitlines() if "WeightsUnpickler error:" in line), str(error))
    return reason.split("WeightsUnpickler error:")[-1].strip().split(". ")[0]


def _file_problem(file: Path) -> str | None:
    """A truncated or corrupted file, judged by its format's own header or checksums."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as weights:
                weights.keys()
        elif file.suffix in (".pt", ".pth", ".bin"):  # torch.save zip archives
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
            if damaged:
                return f"record {damaged} fails its CRC check"
        elif file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
    except Exception as e:  # safetensors, zipfile and json each raise their own types for a damaged file
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"damaged or incomplete ({first_line})"
    return None


def newest_complete_checkpoint(output_dir: str, save_only_model: bool = False) -> str | None:
    """The newest complete and finite `checkpoint-N`; each newer one that is not is skipped with a warning."""
    if not Path(output_dir).is_dir():
        return None
    for checkpoint in reversed(sort_checkpoints(output_dir)):
        problem = checkpoint_problem(checkpoint, save_only_model)
        if problem is None:
            return checkpoint
        logger.warning("ignoring checkpoint %s: %s", checkpoint, problem)
    return None


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
    fields = {f.name: (group, f) for group in recipe.arguments for f in dataclasses.fields(group)}
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


def check_output_dir(recipe: Recipe, args: TrainingArguments) -> None:
    """Before any data is loaded: refuse another run's output_dir (unless overwriting) or a damaged named checkpoint."""
    if args.resume_from_checkpoint:
        problem = checkpoint_problem(args.resume_from_checkpoint, args.save_only_model)
        if problem:
            raise LmpipeError(f"resume_from_checkpoint: {problem}")
        return
    if getattr(args, "overwrite_output_dir", False):  # plain TrainingArguments have no such key: never overwrite
        return
    changes = identity_changes(recipe, args.output_dir)
    if changes:
        raise LmpipeError(
            f"{Path(args.output_dir) / RESOLVED_RECIPE_NAME}: output_dir holds another run ({'; '.join(changes)});"
            " use another output_dir, or set overwrite_output_dir: true to replace it"
        )


def resume_checkpoint(recipe: Recipe, args: TrainingArguments) -> str | None:
    """The checkpoint this run continues from: the named one, else the newest complete one of this same run.

    With `overwrite_output_dir` and another run in the directory, that run's checkpoints are deleted first, so
    that a later resume can never pick up its weights. The callers have run `check_output_dir` before any data.
    """
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    with args.main_process_first(local=False, desc="choosing the checkpoint to resume from"):
        if identity_changes(recipe, args.output_dir):
            if args.process_index == 0:
                _remove_previous_run(args.output_dir)
            return None
        return newest_complete_checkpoint(args.output_dir, args.save_only_model)


def _remove_previous_run(output_dir: str) -> None:
    checkpoints = sort_checkpoints(output_dir)
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)
    logger.warning("overwrite_output_dir: removed another run's %d checkpoint(s) from %s", len(checkpoints), output_dir)
