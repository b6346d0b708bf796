"""The command line a new user meets first: `--help` everywhere, negative numbers, tasks, and paths that say
where they pointed."""

from __future__ import annotations

import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

import lmpipe
from lmpipe.cli import COMMANDS, DEFAULT_PRETRAIN_RECIPE, main
from lmpipe.config.arguments import TASKS
from lmpipe.config.help import TRAINING_KEYS_SHOWN, lmpipe_training_fields
from lmpipe.config.recipe import parse_recipe
from lmpipe.errors import LmpipeError

from conftest import REPO

PIPELINES = sorted((REPO / "pipelines").glob("*.py"))


def _fields(groups) -> list[str]:
    """Every key lmpipe defines: its own dataclasses' and what it adds to TrainingArguments."""
    types = list(groups.values())
    own = [f.name for t in types if not issubclass(t, TrainingArguments) for f in dataclasses.fields(t)]
    return own + [f.name for t in types if issubclass(t, TrainingArguments) for f in lmpipe_training_fields(t)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_prints_its_usage_and_every_key_and_exits_0(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmpipe {command} {COMMANDS[command].usage}")
    keys = {line.split()[0] for line in out.splitlines() if line.startswith("  --")}
    types = {"pretrain": TASKS["pretrain"], "finetune-qa": TASKS["qa"], "check-loss": TASKS["pretrain"]}
    if command in types:  # every key of the task's own dataclasses, with its type and default
        assert {f"--{name}" for name in _fields(types[command])} <= keys
        assert "  --n_layer int (default: 4)" in out and "--learning_rate float" in out


def test_lmpipe_help_lists_every_command_and_no_command_is_an_error(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main([]) == 2


def test_python_m_lmpipe_runs_the_commands(monkeypatch, capsys):
    """`python -m lmpipe COMMAND` (in this process, as runpy runs it) is the console script: usage, exit code."""
    monkeypatch.setattr(sys, "argv", ["lmpipe", "check-loss", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("lmpipe", run_name="__main__")
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: lmpipe check-loss")
    monkeypatch.setattr(sys, "argv", ["lmpipe", "no-such-command"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("lmpipe", run_name="__main__")
    assert exit_.value.code == 2


@pytest.mark.parametrize("script", PIPELINES, ids=lambda path: path.name)
def test_every_pipeline_script_answers_help(script, monkeypatch, capsys):
    """Run as `python pipelines/X.py --help` runs it (in this process: a new interpreter per script costs ~5 s)."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: {script}") and "  --" in out


def test_the_help_shows_every_training_key_the_shipped_recipes_use():
    training_keys = {f.name for f in dataclasses.fields(TrainingArguments)}
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        if recipe.parent.name != "accelerate":
            used = set(yaml.safe_load(recipe.read_text())) & training_keys
            assert used <= set(TRAINING_KEYS_SHOWN), (recipe.name, used - set(TRAINING_KEYS_SHOWN))


def test_a_negative_number_is_a_value_and_a_negative_learning_rate_one_line(tmp_path, capsys):
    assert parse_recipe(["--max_steps", "-1"]).training.max_steps == -1
    with pytest.raises(LmpipeError, match=r"^weight_decay must be >= 0, got -0.5$"):  # parsed, then range-checked
        parse_recipe(["--weight_decay", "-.5"])
    code = main(["pretrain", "--learning_rate", "-1e-3", "--output_dir", str(tmp_path / "run")])
    assert code == 2 and capsys.readouterr().err == "error: learning_rate must be > 0, got -0.001\n"
    assert not (tmp_path / "run").exists()


def test_a_recipe_of_the_other_task_is_refused(capsys):
    qa_recipe = str(REPO / "recipes" / "finetune" / "nq_open.yaml")
    assert main(["pretrain", qa_recipe]) == 2
    assert "a 'qa' recipe, not 'pretrain'" in capsys.readouterr().err


def test_a_missing_relative_path_names_where_it_was_resolved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--train_file", "data/missing.txt", "--output_dir", "run"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: data/missing.txt: data file not found (resolved to {tmp_path / 'data' / 'missing.txt'} from the"
        f" working directory {tmp_path})\n"
    )
    with pytest.raises(LmpipeError, match=r"no such local directory \(resolved to .*outputs/none from"):
        _load_missing_model()


def test_evaluate_on_a_missing_model_directory_leads_with_the_directory(tmp_path, monkeypatch, capsys):
    """Not the Hub's message about repository ids first: `outputs/none` is likelier a mistyped directory."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}) + "\n")
    assert main(["evaluate", "outputs/none", "--task", "multiple_choice", "--data", str(data)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"error: outputs/none: no such local directory (resolved to {tmp_path / 'outputs' / 'none'} from the working"
        f" directory {tmp_path}); nor a tokenizer on the Hub ("
    ), line


def _load_missing_model():
    from lmpipe.config.arguments import ModelArguments
    from lmpipe.model.build import model_positions

    model_positions(ModelArguments(model_name_or_path="outputs/none"))


def test_the_default_recipe_is_package_data_and_the_repo_recipe_is_the_same_file():
    """Installed (also non-editable: CI's second step) the default recipe sits in the package, and the one users
    read under recipes/ is a link to its source."""
    installed = Path(DEFAULT_PRETRAIN_RECIPE)
    assert installed.parent == Path(lmpipe.__file__).parent / "config" and installed.is_file()
    source = REPO / "src" / "lmpipe" / "config" / installed.name
    assert (REPO / "recipes" / "pretrain" / "default.yaml").resolve() == source.resolve()
    assert installed.read_text() == source.read_text()


def test_recipes_under_recipes_read_only_files_inside_the_repository():
    """Every path a shipped recipe names exists relative to the repository root, where their headers run them."""
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        keys = yaml.safe_load(recipe.read_text()) or {}
        for key in ("train_file", "validation_file", "vocab_file", "merges_file"):
            if key in keys:
                path = REPO / keys[key]
                assert path.is_file() and path.resolve().is_relative_to(REPO), (recipe.name, key)
        assert "shared" not in recipe.read_text(), recipe.name
