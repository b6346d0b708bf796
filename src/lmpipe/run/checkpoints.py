"""Resuming: which `checkpoint-N` of an output directory a run may continue from (whose run it is: `run.identity`).

The Trainer writes `checkpoint-N/` in place, file by file, and silently skips a missing optimizer, scheduler or
RNG file on resume; a kill or a full disk can leave a torn checkpoint. We verify a checkpoint before resuming
rather than save atomically: verification also catches files damaged after they were written and checkpoints
from any writer, and needs no override of the Trainer's private save path (transformers itself tried a temporary
directory + rename, huggingface/transformers#27820, and dropped it after multi-node problems, #28364 and #36112).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments
from transformers.trainer_utils import sort_checkpoints
from transformers.utils import CONFIG_NAME

from lmpipe.config.recipe import Recipe
from lmpipe.errors import LmpipeError, where_relative
from lmpipe.model.finite import file_non_finite
from lmpipe.run.files import model_files
from lmpipe.run.identity import identity_changes
from lmpipe.run.manifest import MANIFEST_NAME, manifest_problem

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
STEP = re.compile(r"checkpoint-(\d+)$")
# What a checkpoint needs, as (what, test on a file name); the training state unless `save_only_model`.
NEEDS_WEIGHTS = (
    "model weights (*.safetensors)", lambda n: n.endswith(".safetensors") or n.startswith("pytorch_model_fsdp")
)
NEEDS_TRAINING_STATE = [
    ("optimizer state", lambda n: n.startswith(("optimizer", "global_step"))),  # global_step*: DeepSpeed's
    ("scheduler.pt", lambda n: n == "scheduler.pt"),
    ("rng_state*.pth", lambda n: n.startswith("rng_state")),
]
# What the Trainer reads from trainer_state.json on resume with no safe default: without train_batch_size it fails
# with a traceback, without log_history or num_input_tokens_seen it resumes with a wrong history.
TRAINER_STATE_KEYS = ("global_step", "epoch", "max_steps", "train_batch_size", "log_history", "num_input_tokens_seen")


def checkpoint_problem(checkpoint: str | Path, save_only_model: bool = False) -> str | None:
    """Why `checkpoint` cannot be resumed from exactly, naming the file; None when it is complete, finite, as saved
    and loadable.

    First headers and checksums: safetensors headers, the CRC-32 of every record of torch's zip files, and the
    JSON files, with every key of trainer_state.json the Trainer needs. Then the values: weights and optimizer
    state, read with torch's weights-only loader (tensors and plain containers only: a pickle that would call
    anything else is refused, never run), must hold no NaN or inf, or resuming would only repeat the divergence.
    Then every file against the manifest written last at save time (a checkpoint saved by an older lmpipe has
    none and is judged by the checks above alone), and the weights' shapes against the checkpoint's config.json.
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
    missing = [key for key in TRAINER_STATE_KEYS if not isinstance(recorded, dict) or recorded.get(key) is None]
    if missing:
        return f"{state}: no {', '.join(missing)} (not a whole trainer state)"
    if step and int(step.group(1)) != recorded["global_step"]:
        return f"{state}: records step {recorded['global_step']}, not {step.group(1)}"
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            poisoned = file_non_finite(file)
        except pickle.UnpicklingError as e:  # torch's weights-only loader refuses, and runs, nothing else
            return f"{file}: not loadable with weights_only ({_unpickler_reason(e)})"
        if poisoned:
            return f"{file}: {poisoned} (a diverged run's checkpoint)"
    return manifest_problem(path) or _shape_problem(path)


def _shape_problem(checkpoint: Path) -> str | None:
    """A weight whose shape is not the one the checkpoint's config.json gives it (loading it would fail).

    The config's model is built on the meta device (no memory, no values); a checkpoint without config.json (LoRA
    adapters) or of an architecture transformers does not know is left to the loader.
    """
    if not (checkpoint / CONFIG_NAME).is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        return f"{checkpoint / CONFIG_NAME}: not a model config ({(str(e).strip().splitlines() or [''])[0]})"
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        return None
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = weights.get_slice(key).get_shape()
                if key in expected and shape != expected[key]:
                    return f"{file}: {key} has shape {shape}, but {CONFIG_NAME} makes it {expected[key]}"
    return None


def saved_model_problem(directory: str | Path) -> str | None:
    """Why the model saved in `directory` is not as it was written: its manifest, or for a directory without one
    (a run finished by an older lmpipe, another tool's model) the headers of its model files."""
    directory = Path(directory)
    if (directory / MANIFEST_NAME).is_file():
        return manifest_problem(directory)
    for file in model_files(directory).values():
        problem = _file_problem(file)
        if problem:
            return f"{file}: {problem}"
    return None


def verified_model_dir(name: str) -> str:
    """`name`, or when the model saved there fails verification, its newest `checkpoint-N` whose model passes, with
    a one-line warning; an error when none does. A Hub id passes as it is."""
    if not Path(name).is_dir():
        return name
    problem = saved_model_problem(name)
    if problem is None:
        return name
    for checkpoint in reversed(sort_checkpoints(name)):
        if model_files(Path(checkpoint)) and saved_model_problem(checkpoint) is None:
            logger.warning("%s; using %s, the newest checkpoint that verifies", problem, checkpoint)
            return checkpoint
    raise LmpipeError(f"{problem}; and no checkpoint-N in {name} verifies")


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


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(STEP.search(str(checkpoint)).group(1))


def newest_complete_checkpoint(
    output_dir: str, save_only_model: bool = False, before_step: int | None = None
) -> str | None:
    """The newest complete and finite `checkpoint-N` (with N < `before_step` when given); each newer one that is not
    is skipped with a warning."""
    if not Path(output_dir).is_dir():
        return None
    for checkpoint in reversed(sort_checkpoints(output_dir)):
        if before_step is not None and checkpoint_step(checkpoint) >= before_step:
            continue
        problem = checkpoint_problem(checkpoint, save_only_model)
        if problem is None:
            return checkpoint
        logger.warning("ignoring checkpoint %s: %s", checkpoint, problem)
    return None


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
