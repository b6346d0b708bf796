"""`final_evaluation: false`: a run that asks for no evaluation runs none; one logged at the last step is reused."""

from __future__ import annotations

import json

import pytest

from lmpipe.cli import main
from lmpipe.training.trainer import ExactEvalTrainer

from conftest import tiny_run

pytestmark = pytest.mark.slow  # every test trains a tiny pretraining run

EVALUATION_KEYS = {"eval_loss", "perplexity", "eval_tokens", "bits_per_byte", "trainer_batch_mean_eval_loss"}


@pytest.fixture
def evaluations(monkeypatch) -> list[int]:
    """The global step of every evaluation the run's Trainer makes."""
    steps = []
    evaluate = ExactEvalTrainer.evaluate

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(ExactEvalTrainer, "evaluate", counted)
    return steps


def pretrain(text_file, output_dir, *flags: str) -> dict:
    argv = ["pretrain", "--train_file", str(text_file), *tiny_run(max_steps=4), "--output_dir", str(output_dir), *flags]
    assert main(argv) == 0
    return json.loads((output_dir / "metrics.json").read_text())


def test_no_evaluation_when_the_recipe_asks_for_none(text_file, tmp_path, evaluations, capsys):
    metrics = pretrain(
        text_file, tmp_path / "none", "--eval_strategy", "no", "--save_strategy", "no", "--final_evaluation", "false"
    )
    assert evaluations == []
    assert not EVALUATION_KEYS & set(metrics)
    assert metrics["train_steps"] == 4 and metrics["train_loss"] > 0
    assert "no final evaluation (final_evaluation: false)" in capsys.readouterr().out
    assert (tmp_path / "none" / "model.safetensors").is_file()

    default = pretrain(text_file, tmp_path / "default", "--eval_strategy", "no", "--save_strategy", "no")  # evaluated
    assert evaluations == [4] and set(default) >= EVALUATION_KEYS
    assert default["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-6)


def test_an_evaluation_at_the_last_step_is_reported_without_another(text_file, tmp_path, evaluations):
    metrics = pretrain(
        text_file, tmp_path / "steps", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
        "--save_steps", "4", "--final_evaluation", "false",
    )
    assert evaluations == [2, 4]
    state = json.loads((tmp_path / "steps" / "checkpoint-4" / "trainer_state.json").read_text())
    last = [row for row in state["log_history"] if "eval_loss" in row][-1]
    assert last["step"] == 4 and metrics["eval_loss"] == last["eval_loss"]
