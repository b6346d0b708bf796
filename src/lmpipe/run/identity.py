"""A run's identity: what must match for a rerun of a command to continue the run already in its output directory.

One table, `RESUME_KEYS`, says for every recipe key whether it may change between resumes; resume, the finished-run
check and the Hub push all ask `identity_changes`. Besides the recipe (`recipe.yaml`), a run records in
`identity.json` what the recipe only names: the content of every local file it reads (data, tokenizer, starting
model) and the number of processes. A change that may not happen is refused in one line naming the key (or the
file) and both values; a change that may happen is applied for real (`training.resume_settings`) and recorded
there, with the step it took effect, for the model card.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from transformers import SchedulerType, TrainingArguments
from transformers.trainer_utils import sort_checkpoints

from lmpipe.config.recipe import TASK_KEY, Recipe
from lmpipe.config.rules import MUON_KEYS, WSD_KEYS
from lmpipe.data.sources import PYDOC, pydoc_documents
from lmpipe.run.files import IDENTITY_NAME, METRICS_NAME, RESOLVED_RECIPE_NAME, write_text_atomically

MAY_CHANGE, MAY_NOT_CHANGE = True, False
_SKIPS_OR_REPEATS = "the Trainer skips the trained data by steps: another batch geometry skips or repeats blocks"
_APPLIED_OPTIMIZER = "the optimizer uses the new value from the resumed step (the Trainer would restore the old one)"
_APPLIED_SCHEDULE = "the schedule is recomputed with it at the resumed step"
_APPLIED_CADENCE = "the new cadence from the resumed step (the Trainer would keep the checkpoint's)"
# Every key whose class is not its group's default: keys of TrainingArguments may change (the Trainer reads them
# each session: logging, evaluation, saving, precision, reporting...), keys of every other group may not (they are
# the data, tokenizer and model the run trains), and neither may the content of the files those name.
RESUME_KEYS: dict[str, tuple[bool, str]] = {
    "learning_rate": (MAY_CHANGE, _APPLIED_OPTIMIZER + "; the schedule's base rate too"),
    "weight_decay": (MAY_CHANGE, _APPLIED_OPTIMIZER),
    "adam_beta1": (MAY_CHANGE, _APPLIED_OPTIMIZER),
    "adam_beta2": (MAY_CHANGE, _APPLIED_OPTIMIZER),
    "adam_epsilon": (MAY_CHANGE, _APPLIED_OPTIMIZER),
    **dict.fromkeys(MUON_KEYS, (MAY_CHANGE, _APPLIED_OPTIMIZER)),
    "max_steps": (MAY_CHANGE, _APPLIED_SCHEDULE),
    "num_train_epochs": (MAY_CHANGE, _APPLIED_SCHEDULE),
    "lr_scheduler_type": (MAY_CHANGE, _APPLIED_SCHEDULE),
    "lr_scheduler_kwargs": (MAY_CHANGE, _APPLIED_SCHEDULE),
    "warmup_steps": (MAY_CHANGE, _APPLIED_SCHEDULE),
    **dict.fromkeys(WSD_KEYS, (MAY_CHANGE, _APPLIED_SCHEDULE)),
    "logging_steps": (MAY_CHANGE, _APPLIED_CADENCE),
    "eval_steps": (MAY_CHANGE, _APPLIED_CADENCE),
    "save_steps": (MAY_CHANGE, _APPLIED_CADENCE),
    "preprocessing_num_workers": (MAY_CHANGE, "how the data is prepared, not what it is"),
    "generation_max_new_tokens": (MAY_CHANGE, "acts after training (the final QA scores)"),
    "merge_lora": (MAY_CHANGE, "acts after training (the merged copy)"),
    "seed": (MAY_NOT_CHANGE, "the initialisation and the data order"),
    "data_seed": (MAY_NOT_CHANGE, "the data order"),
    "per_device_train_batch_size": (MAY_NOT_CHANGE, _SKIPS_OR_REPEATS),
    "gradient_accumulation_steps": (MAY_NOT_CHANGE, _SKIPS_OR_REPEATS),
    "world_size": (MAY_NOT_CHANGE, _SKIPS_OR_REPEATS + ", and each process restores its own RNG state"),
    "auto_find_batch_size": (MAY_NOT_CHANGE, _SKIPS_OR_REPEATS),
    "dataloader_drop_last": (MAY_NOT_CHANGE, _SKIPS_OR_REPEATS),
    "group_by_length": (MAY_NOT_CHANGE, "the data order"),
    "optim": (MAY_NOT_CHANGE, "the checkpoint's optimizer state belongs to its optimizer"),
    "optim_args": (MAY_NOT_CHANGE, "the checkpoint's optimizer state belongs to its optimizer"),
    "optimizer": (MAY_NOT_CHANGE, "adamw and muon keep different optimizer states"),
    "include_num_input_tokens_seen": (MAY_NOT_CHANGE, "the run's count of trained tokens"),
}

# The keys that reduce_lr_on_plateau does not take from the recipe on a resume: its restored state holds the rate.
PLATEAU_KEEPS = ("learning_rate", "muon_learning_rate")
# Files of a model directory that are fingerprinted: its weights, configs, vocabulary and templates.
MODEL_DIRECTORY_SUFFIXES = (".safetensors", ".json", ".txt", ".jinja", ".model")
# Files of a tokenizer directory that are fingerprinted (a run's directory also holds weights it does not read).
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# Fingerprints read at most this many blocks of this size, evenly spaced, first and last included.
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 64, 1 << 20


def identity_changes(recipe: Recipe, output_dir: str) -> list[str]:
    """How this command differs from the run already in `output_dir` in what may not change (empty: the same run,
    or no run there), each as `key old -> new` or `path: content changed ...`.

    The table's keys (and `world_size`) are compared as the run used them, recorded in `identity.json`; the other
    keys as `recipe.yaml` writes them (absent keys take the dataclass default), without parsing it: building a
    second `TrainingArguments` would reset the process's Accelerate state under a live Trainer.
    """
    before, problem = _previous_recipe(output_dir)
    if problem:
        return [problem]
    if before is None:
        return []
    fields = _fields(recipe)
    foreign = sorted(key for key in before if key not in fields and key != TASK_KEY)
    changes = [f"keys of another command: {', '.join(foreign)}"] if foreign else []
    if before.get(TASK_KEY, recipe.task) != recipe.task:
        changes.append(f"{TASK_KEY} {before[TASK_KEY]!r} -> {recipe.task!r}")
    for name, (group, field) in fields.items():
        if name in RESUME_KEYS or isinstance(group, TrainingArguments):
            continue
        old, new = before.get(name, _default(field)), getattr(group, name)
        if old != new:
            changes.append(f"{name} {old!r} -> {new!r}")
    recorded = _recorded(output_dir)
    changes += _setting_changes(recipe, before, recorded.get("settings"), MAY_NOT_CHANGE)
    if SchedulerType(recipe.training.lr_scheduler_type) == SchedulerType.REDUCE_ON_PLATEAU:
        changes += [
            f"{change}, which lr_scheduler_type reduce_lr_on_plateau would not apply (it keeps the checkpoint's rate)"
            for change in _setting_changes(recipe, before, recorded.get("settings"), MAY_CHANGE)
            if change.split()[0] in PLATEAU_KEEPS
        ]
    current = input_fingerprints(recipe)
    for path, old in recorded.get("files", {}).items():
        new = current.get(path)
        if new is not None and new != old:
            changes.append(f"{path}: content changed since the run started ({_describe(old)} -> {_describe(new)})")
    return changes


def applied_changes(recipe: Recipe, output_dir: str) -> list[str]:
    """The table's keys that may change and did, against the run in `output_dir`, as `key old -> new`."""
    before, problem = _previous_recipe(output_dir)
    if problem or before is None:
        return []
    return _setting_changes(recipe, before, _recorded(output_dir).get("settings"), MAY_CHANGE)


def record_identity(recipe: Recipe, output_dir: str, resumed_from: str | None) -> None:
    """Write `identity.json` (rank 0, before `recipe.yaml`, which it compares against): the table's keys as this
    session uses them, the processes, the files' fingerprints, and every resume that changed a key, with its step.
    A new run starts a new list."""
    resumes = []
    if resumed_from is not None:
        resumes = recorded_resumes(output_dir)
        changes = applied_changes(recipe, output_dir)
        if changes:
            step = json.loads((Path(resumed_from) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
            resumes = [*resumes, {"step": step, "changes": changes}]
    record = {"settings": current_settings(recipe), "files": input_fingerprints(recipe), "resumes": resumes}
    path = Path(output_dir) / IDENTITY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")


def current_settings(recipe: Recipe) -> dict[str, Any]:
    """The value of each key of the table as this run uses it (after the defaults and what the arguments derive
    themselves), and `world_size`: the processes of this launch; as JSON values, an integral float as an int
    (the arguments make `logging_steps: 1` 1.0)."""
    fields = _fields(recipe)
    values = {name: getattr(fields[name][0], name) for name in RESUME_KEYS if name in fields}
    values["world_size"] = recipe.training.world_size
    return {name: _plain(value) for name, value in json.loads(json.dumps(values, default=str)).items()}


def recorded_resumes(output_dir: str | Path) -> list[dict[str, Any]]:
    """The resumes of the run in `output_dir` that changed a key: [{"step": N, "changes": ["key old -> new"]}]."""
    return _recorded(output_dir).get("resumes", [])


def input_fingerprints(recipe: Recipe) -> dict[str, str]:
    """{path: fingerprint} of every local file the recipe reads: data files (`datasets:` entries too), the
    `builtin:pydoc` corpus, vocab/merges files, a chat template file, the tokenizer files of a local tokenizer
    directory and the files of a local model directory. Hub ids are identified by their id (and config) in
    `recipe.yaml` alone."""
    data, tokenizer, model = recipe.data, recipe.groups.get("tokenizer"), recipe.model
    files = [getattr(data, "train_file", None), getattr(data, "validation_file", None)]
    for entry in getattr(data, "datasets", None) or []:
        try:
            entry = json.loads(entry) if isinstance(entry, str) else entry
        except ValueError:
            continue  # the data loader names the malformed entry
        files.append(entry.get("path") if isinstance(entry, dict) else None)
    files += [getattr(tokenizer, "vocab_file", None), getattr(tokenizer, "merges_file", None)]
    template = getattr(data, "chat_template", None) or ""
    files.append(template if template.endswith(".jinja") else None)  # else the template's own text, in recipe.yaml
    tokenizer_directory = getattr(tokenizer, "tokenizer_name_or_path", None)
    if tokenizer_directory and Path(tokenizer_directory).is_dir():
        files += sorted(str(p) for p in Path(tokenizer_directory).iterdir() if p.name in TOKENIZER_FILES)
    if model.model_name_or_path and Path(model.model_name_or_path).is_dir():
        files += sorted(
            str(p) for p in Path(model.model_name_or_path).iterdir()
            if p.suffix in MODEL_DIRECTORY_SUFFIXES and p.name not in (METRICS_NAME, IDENTITY_NAME) and p.is_file()
        )
    fingerprints = {path: file_fingerprint(path) for path in files if isinstance(path, str) and Path(path).is_file()}
    named_files = getattr(data, "train_file", None) or getattr(data, "datasets", None)
    if getattr(data, "dataset_name", None) == PYDOC and not named_files:
        text = "\0".join(pydoc_documents()).encode("utf-8")
        fingerprints[PYDOC] = f"{len(text)}:{hashlib.sha256(text).hexdigest()}"
    return fingerprints


def file_fingerprint(path: str) -> str:
    """`SIZE:SHA256` of the file's size and of up to FINGERPRINT_BLOCKS evenly spaced blocks (the whole file when
    it is smaller): a replaced or edited file changes its size or a sampled block, and a large corpus is not read
    through on every rerun. Cached per (path, size, mtime, inode) for the process's several checks."""
    stat = Path(path).stat()
    return _fingerprint(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=256)
def _fingerprint(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES:
            for block in iter(lambda: handle.read(FINGERPRINT_BLOCK_BYTES), b""):
                digest.update(block)
        else:
            last = size - FINGERPRINT_BLOCK_BYTES
            for number in range(FINGERPRINT_BLOCKS):
                handle.seek(number * last // (FINGERPRINT_BLOCKS - 1))
                digest.update(handle.read(FINGERPRINT_BLOCK_BYTES))
    return f"{size}:{digest.hexdigest()}"


def checkpoint_world_size(checkpoint: str | Path) -> int | None:
    """The processes that saved `checkpoint`, from the Trainer's RNG files: `rng_state.pth` for one,
    `rng_state_K.pth` for each of several; None without RNG files (`save_only_model`)."""
    if (Path(checkpoint) / "rng_state.pth").is_file():
        return 1
    ranks = [int(p.stem.rsplit("_", 1)[1]) for p in Path(checkpoint).glob("rng_state_*.pth") if p.stem[10:].isdigit()]
    return max(ranks) + 1 if ranks else None


def _describe(fingerprint: str) -> str:
    size, digest = fingerprint.split(":", 1)
    return f"{int(size):,} bytes, sampled sha256 {digest[:12]}"


def _fields(recipe: Recipe) -> dict[str, tuple[Any, dataclasses.Field]]:
    return {f.name: (group, f) for group in recipe.groups.values() for f in dataclasses.fields(group) if f.init}


def _setting_changes(
    recipe: Recipe, before: dict[str, Any], settings: dict[str, Any] | None, changeable: bool
) -> list[str]:
    """`key old -> new` for each key of the table of class `changeable` whose value differs from the recorded
    `settings`. A key they lack (a run recorded without them, or before the table listed the key) is compared as
    both recipes write it (a key absent from one takes the dataclass default, so a value the arguments derive
    themselves never counts)."""
    fields, now = _fields(recipe), current_settings(recipe)
    written = recipe.resolved()
    changes = []
    for name, (may, _) in RESUME_KEYS.items():
        if may != changeable or name not in now:
            continue
        if settings is not None and name in settings:
            old, new = settings[name], now[name]
        elif name in fields:
            default = _default(fields[name][1])
            old, new = before.get(name, default), written.get(name, default)
        else:
            continue
        if old != new:
            changes.append(f"{name} {_plain(old)!r} -> {_plain(new)!r}")
    return changes


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _previous_recipe(output_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the recorded recipe or None when there is no run, a reason it cannot be read or None)."""
    previous = Path(output_dir) / RESOLVED_RECIPE_NAME
    if not previous.is_file():
        has_checkpoints = Path(output_dir).is_dir() and sort_checkpoints(output_dir)
        return None, f"checkpoints but no {RESOLVED_RECIPE_NAME}" if has_checkpoints else None
    try:
        before = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"an unreadable {RESOLVED_RECIPE_NAME} ({type(e).__name__})"
    if not isinstance(before, dict):
        return None, f"a {RESOLVED_RECIPE_NAME} that is not a mapping"
    return before, None


def _recorded(output_dir: str | Path) -> dict[str, Any]:
    """`identity.json` of the run in `output_dir`; empty for a run recorded before it existed (or unreadable:
    `recipe.yaml` still says whose run it is)."""
    try:
        recorded = json.loads((Path(output_dir) / IDENTITY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default
