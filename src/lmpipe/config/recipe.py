"""Recipes: one flat YAML per run, parsed into named argument groups (`config.arguments`); CLI flags override.

Every YAML key becomes a `--key value` flag placed before the command-line flags, so YAML values are
type-checked by the same `HfArgumentParser` as flags and a later flag wins. Unknown keys are errors, and so are keys
the run would not read (`config.rules.UNUSED_WHEN`). A data source on the command line (`--train_file`,
`--dataset_name`, `--datasets`) replaces the recipe's whole source, its validation_file included.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from transformers import HfArgumentParser

from lmpipe.config.arguments import (
    PRETRAIN_GROUPS,
    TASKS,
    DataArguments,
    LoraArguments,
    ModelArguments,
    QAArguments,
    RunTrainingArguments,
    TokenizerArguments,
)
from lmpipe.config.rules import READ_ONLY_WITH, check_nulls, check_recipe_values, unused_reason
from lmpipe.errors import LmpipeError

Group = TypeVar("Group")

# Keys that must never come from a recipe: the token is read from the environment / login cache only.
FORBIDDEN_KEYS = {"hub_token"}
# The key naming a recipe's command; written first in every run's recipe.yaml so the run says what it was.
TASK_KEY = "task"
# Keys another task takes, refused with the reason rather than a "did you mean" guess.
NOT_FOR_TASK = {("qa", "streaming"): "only pretraining streams; QA and conversation data are read in memory"}
# Where a run's data comes from: a source named on the command line replaces all of the recipe file's.
SOURCE_KEYS = ("train_file", "validation_file", "dataset_name", "dataset_config_name", "datasets")
NAMING_A_SOURCE = ("train_file", "dataset_name", "datasets")
# A value such as -1e-3 or -.5 after a flag: argparse would take it for an option.
NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf$|nan$)", re.IGNORECASE)


@dataclass
class Recipe:
    """The parsed groups by name (a task's `model`, `tokenizer`, `data`, `lora`, `training`, and a command's own),
    and the keys the user set explicitly."""

    groups: dict[str, Any]
    explicit: dict[str, Any]
    source: str | None
    task: str | None = None  # a key of TASKS for training recipes; None for commands that train nothing

    @property
    def model(self) -> ModelArguments:
        return self.groups["model"]

    @property
    def tokenizer(self) -> TokenizerArguments:
        return self.groups["tokenizer"]

    @property
    def data(self) -> DataArguments | QAArguments:
        return self.groups["data"]

    @property
    def lora(self) -> LoraArguments:
        return self.groups["lora"]

    @property
    def training(self) -> RunTrainingArguments:
        return self.groups["training"]

    def resolved(self) -> dict[str, Any]:
        """The task, then the explicitly set keys with their final typed values: a recipe that reruns this run."""
        values = {}
        for args in self.groups.values():
            for f in dataclasses.fields(args):
                if f.name in self.explicit and f.init:  # init=False: set by lmpipe, not a key (DPO's max_length)
                    values[f.name] = _plain(getattr(args, f.name))
        if values.get("report_to") == []:  # TrainingArguments parses "none" into []: write what parses back to it
            values["report_to"] = "none"
        keys = {k: values[k] for k in self.explicit if k in values}
        return {TASK_KEY: self.task, **keys} if self.task else keys


def _plain(value: Any) -> Any:
    """YAML-safe form of a parsed value (enums by value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _RecipeParser(HfArgumentParser):
    """HfArgumentParser whose argparse errors raise one-line LmpipeErrors instead of printing usage."""

    def error(self, message: str):  # argparse calls this on a bad flag or value
        raise LmpipeError(message)


def _to_flags(mapping: dict[str, Any]) -> list[str]:
    """`--key=value` (one token, so a value starting with '-' is never read as a flag); lists as separate values."""
    flags = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{key}={str(value).lower()}")
        elif isinstance(value, (list, tuple)):  # a mapping in a list (a `datasets:` source) travels as JSON
            flags += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        elif isinstance(value, dict):
            flags.append(f"--{key}={json.dumps(value)}")
        else:
            flags.append(f"--{key}={value}")
    return flags


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-3` -> `--learning_rate=-1e-3`: argparse reads only plain `-1` or `-.5` as values."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if NEGATIVE_NUMBER.match(arg) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def _closest(key: str, known: set[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _why_unknown(key: str, known: set[str], task: str | None, prefix: str = "") -> str:
    reason = NOT_FOR_TASK.get((task, key))
    return f": {reason}" if reason else _closest(key, known, prefix)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe with both is ambiguous."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmpipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmpipeError(f"{path}: cannot read recipe ({e})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LmpipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmpipeError(f"{path}: a recipe is a flat mapping of key: value, got {type(data).__name__}")
    return data


def _flag_keys(argv: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


def _flag_value(argv: list[str], key: str) -> str | None:
    """The value the last `--key V` or `--key=V` gives, as written; None when the flag is absent."""
    value = None
    for index, word in enumerate(argv):
        if word == f"--{key}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif word.startswith(f"--{key}="):
            value = word.split("=", 1)[1]
    return value


# lmpipe's defaults where TrainingArguments' own do not suit a language-model run; any recipe or flag wins.
TRAINING_DEFAULTS = {
    "report_to": "tensorboard",
    "include_num_input_tokens_seen": True,
    "logging_steps": 10,
    "dataloader_pin_memory": torch.cuda.is_available(),
}


class HelpRequested(Exception):
    """`-h` / `--help` among the arguments: the command prints `str(self)` (every key it takes) and exits 0."""


def parse_recipe(
    argv: list[str],
    groups: dict[str, type] = PRETRAIN_GROUPS,
    default_recipe: str | None = None,
    defaults: dict[str, Any] = TRAINING_DEFAULTS,
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Recipe:
    """Parse `[RECIPE.yaml] [--key value ...]` into the named dataclasses `groups`; raises LmpipeError on any mistake.

    A recipe's `task` key, when present, must be the task of `groups` (a pretraining recipe given to fine-tuning
    is refused); commands that train nothing have no task and take no such key.
    `adjust` rewrites the recipe file's keys before the flags apply (e.g. a finished run's recipe, loaded back).
    """
    if "-h" in argv or "--help" in argv:
        from lmpipe.config.help import recipe_help

        raise HelpRequested(recipe_help(tuple(groups.values()), defaults))
    parser = _RecipeParser(list(groups.values()))
    known = {action.dest for action in parser._actions} - {"help"}
    source = argv[0] if argv and not argv[0].startswith("-") else default_recipe
    cli = _join_negative_values(argv[1:] if argv and not argv[0].startswith("-") else list(argv))
    recipe = _read_yaml(source) if source else {}
    task = task_of(groups)
    if task is not None and TASK_KEY in recipe:
        if recipe[TASK_KEY] != task:
            raise LmpipeError(
                f"{source}: a '{recipe.pop(TASK_KEY)}' recipe, not '{task}'; "
                "pretraining recipes run with `lmpipe pretrain`, qa ones with `lmpipe finetune-qa`, "
                "dpo ones with `lmpipe dpo`"
            )
        del recipe[TASK_KEY]
    if adjust is not None:
        recipe = adjust(recipe)
    for key in recipe:
        if key in FORBIDDEN_KEYS:
            raise LmpipeError(f"{source}: '{key}' may not be set in a recipe; use HF_TOKEN or `hf auth login`")
        if key not in known:
            raise LmpipeError(f"{source}: unknown key '{key}'{_why_unknown(key, known, task)}")
    for key in _flag_keys(cli):
        if key in FORBIDDEN_KEYS:
            raise LmpipeError(f"--{key} may not be given; use HF_TOKEN or `hf auth login`")
        if key not in known and not (key.startswith("no_") and key[3:] in known):
            raise LmpipeError(f"unknown option --{key}{_why_unknown(key, known, task, '--')}")
    flag_keys = [k[3:] if k.startswith("no_") else k for k in _flag_keys(cli)]
    if any(key in flag_keys for key in NAMING_A_SOURCE):
        recipe = {key: value for key, value in recipe.items() if key not in SOURCE_KEYS}
    for key, (value, dependent) in READ_ONLY_WITH.items():
        if _flag_value(cli, key) not in (None, value):
            recipe = {k: v for k, v in recipe.items() if k not in dependent}
    recipe_flags = _to_flags({**defaults, **recipe})
    try:  # with the flags first: a flag may satisfy a check the recipe alone fails (bf16 needs --use_cpu on CPU)
        parsed = dict(zip(groups, _parse(parser, recipe_flags + cli)))
    except LmpipeError as error:
        try:  # the recipe alone failing the same way is the recipe's fault: name the file
            _parse(parser, recipe_flags)
        except LmpipeError as recipe_error:
            if str(recipe_error) == str(error):
                raise LmpipeError(f"{source}: {error}") from None
        raise
    check_nulls(recipe, parsed.values(), source)
    check_recipe_values(parsed.values(), set(recipe) - set(flag_keys), source)
    check_unused_keys(recipe, flag_keys, parsed.values(), source)
    explicit = dict.fromkeys([*recipe, *flag_keys])
    return Recipe(groups=parsed, explicit=explicit, source=source, task=task)


def check_unused_keys(recipe: dict[str, Any], flag_keys: list[str], groups: Any, source: str | None) -> None:
    """Refuse a key the run would not read (`config.rules.UNUSED_WHEN`), never ignore it: a flag against the final
    values, a recipe file's key against the file's own (a flag that turns a recipe key off, such as
    `--train_tokenizer false` under a `tokenizer_vocab_size`, is the user's choice)."""
    fields = {f.name: (args, f) for args in groups for f in dataclasses.fields(args)}
    final = {name: getattr(args, name) for name, (args, _) in fields.items()}
    own = {name: recipe.get(name, None if f.default is dataclasses.MISSING else f.default)
           for name, (_, f) in fields.items()}
    for key in dict.fromkeys(flag_keys):
        reason = unused_reason(key, final)
        if reason:
            raise LmpipeError(f"--{key} is not used by this run: {reason}")
    for key in recipe:
        reason = None if key in flag_keys else unused_reason(key, own)
        if reason:
            raise LmpipeError(f"{source}: {key} is not used by this run: {reason}")


def parse_arguments(argv: list[str], group: type[Group]) -> Group:
    """The flags of a command that takes one dataclass and no recipe defaults (perplexity, evaluate, push)."""
    return parse_recipe(argv, {"arguments": group}, defaults={}).groups["arguments"]


def task_of(groups: dict[str, type]) -> str | None:
    """The training task whose groups `groups` holds (the loss check adds its own), else None."""
    return next((task for task, task_groups in TASKS.items() if task_groups.items() <= groups.items()), None)


def read_recipe_file(path: str) -> dict[str, Any]:
    """A recipe file's keys as written (one line on any error)."""
    return _read_yaml(path)


def recipe_task(path: str) -> str | None:
    """The `task` a recipe file names (run directories' recipe.yaml always do), or None."""
    task = _read_yaml(path).get(TASK_KEY)
    if task is not None and task not in TASKS:
        raise LmpipeError(f"{path}: {TASK_KEY} must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def _parse(parser: _RecipeParser, flags: list[str]) -> tuple:
    try:
        *arguments, rest = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    except (ValueError, TypeError) as e:  # raised by a dataclass __post_init__, e.g. TrainingArguments
        raise LmpipeError(str(e).strip().splitlines()[0]) from None
    if rest:
        raise LmpipeError(f"unexpected arguments: {' '.join(rest)}")
    return tuple(arguments)
