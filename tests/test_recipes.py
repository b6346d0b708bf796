"""Every YAML under recipes/ (and accelerate_config.yaml) loads the way its command loads it, one test per file.

lmpipe recipes are parsed by the command's own parser (nothing is read but the recipe) from the repository root,
where their headers run them, and each key must be one `lmpipe COMMAND --help` lists. Accelerate configs are loaded
by accelerate's own config class, as `accelerate launch --config_file` loads them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re

import pytest
import torch
import yaml

from lmpipe.cli import main
from lmpipe.config.recipe import TASK_KEY, TASKS, parse_recipe

from conftest import REPO

ACCELERATE_DIR = REPO / "recipes" / "accelerate"
ALL_YAML = sorted((REPO / "recipes").rglob("*.yaml"))
ACCELERATE_CONFIGS = [REPO / "accelerate_config.yaml", *(path for path in ALL_YAML if path.parent == ACCELERATE_DIR)]
LMPIPE_RECIPES = [path for path in ALL_YAML if path.parent != ACCELERATE_DIR]
TASK_OF_FOLDER = {"pretrain": "pretrain", "finetune": "qa", "preference": "dpo"}
COMMAND_OF_TASK = {"pretrain": "pretrain", "qa": "finetune-qa", "dpo": "dpo"}


def test_every_yaml_under_recipes_is_checked_here():
    """A new folder under recipes/ needs a rule here (which command runs its files) rather than being skipped."""
    assert ALL_YAML and {path.parent.name for path in LMPIPE_RECIPES} <= set(TASK_OF_FOLDER)
    assert len(ALL_YAML) == len(LMPIPE_RECIPES) + len(ACCELERATE_CONFIGS) - 1  # - the root's accelerate_config.yaml


def read(path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def recipe_task(path) -> str:
    """The recipe's `task` key, which must agree with its folder; a recipe without one: its folder's task."""
    task = read(path).get(TASK_KEY, TASK_OF_FOLDER[path.parent.name])
    assert task == TASK_OF_FOLDER[path.parent.name], f"a '{task}' recipe under recipes/{path.parent.name}/"
    return task


@functools.cache
def help_keys(command: str) -> frozenset[str]:
    """The keys `lmpipe COMMAND --help` lists (`  --key type (default: ...)`)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([command, "--help"]) == 0
    return frozenset(re.findall(r"^  --(\w+) ", out.getvalue(), re.MULTILINE))


@pytest.mark.parametrize("path", LMPIPE_RECIPES, ids=lambda path: str(path.relative_to(REPO / "recipes")))
def test_recipe_parses_and_every_key_is_in_the_commands_help(path, monkeypatch):
    task, keys = recipe_task(path), read(path)
    monkeypatch.chdir(REPO)  # the recipes' relative paths (train_file: data/...) are relative to the repository root
    flags = []
    if keys.get("bf16") and not torch.cuda.is_available():
        # gpt2-small.yaml is a bf16 recipe for 8 GPUs: TrainingArguments refuses bf16 on a machine without a GPU
        # unless use_cpu is set (transformers' check, not lmpipe's); the smallest override that parses it here.
        flags = ["--use_cpu", "true"]
    assert parse_recipe([str(path.relative_to(REPO)), *flags], groups=TASKS[task]).task == task

    command = COMMAND_OF_TASK[task]
    missing = sorted(set(keys) - {TASK_KEY} - help_keys(command))  # `task` picks the command; --help lists no such key
    assert not missing, f"{path.name}: keys that `lmpipe {command} --help` does not list: {missing}"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: str(path.relative_to(REPO)))
def test_accelerate_config_loads_with_accelerates_own_class(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType, PrecisionType

    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` calls; unknown keys raise
    assert isinstance(config, ClusterConfig)
    assert isinstance(config.distributed_type, DistributedType), config.distributed_type  # known: made an enum
    assert config.mixed_precision in {p.value for p in PrecisionType}, config.mixed_precision
    assert config.num_processes >= 1 and 0 <= config.machine_rank < config.num_machines
