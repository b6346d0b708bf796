"""Reruns are idempotent and a diverged run leaves no poisoned checkpoint.

- Rerunning a finished run's command trains nothing and touches no file (and a run killed after its last
  checkpoint finishes without a step past `max_steps`); a larger `max_steps` continues from the
  last checkpoint and ends with the weights of a run that was given that `max_steps` from the start (constant
  learning rate, so both runs see the same schedule).
- Non-finite weights or optimizer state after a step that is due to be saved stop the run without saving; the
  message names the newest finite checkpoint (or says there is none). A checkpoint on disk with a NaN tensor in
  its safetensors file is skipped on resume and refused as `resume_from_checkpoint`.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from lmpipe.cli import main
from lmpipe.run.checkpoints import checkpoint_problem

from conftest import arm, tiny_run, write_pydoc_corpus

pytestmark = pytest.mark.slow  # every test trains tiny pretraining runs

TINY = tiny_run(
    per_device_eval_batch_size=16, seed=3, save_steps=2, logging_steps=1, validation_split_percentage=25,
    learning_rate=0.003, lr_scheduler_type="constant",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_pydoc_corpus(tmp_path_factory.mktemp("rerun") / "corpus.txt", 12)


def command(corpus, output, max_steps):
    return ["pretrain", "--train_file", str(corpus), "--output_dir", str(output), *TINY, "--max_steps", str(max_steps)]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A run finished at 4 steps, with checkpoints 2 and 4."""
    output = tmp_path_factory.mktemp("finished") / "run"
    assert main(command(corpus, output, 4)) == 0
    return output


def snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def test_rerunning_a_finished_run_trains_nothing_and_says_where_it_is(corpus, finished, tmp_path, capsys):
    output = shutil.copytree(finished, tmp_path / "run")
    metrics = json.loads((output / "metrics.json").read_text())
    before = snapshot(output)
    capsys.readouterr()
    assert main(command(corpus, output, 4)) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        f"{output} holds this run, finished after 4 steps: nothing to train. Its results are in"
        f" {output / 'metrics.json'}; raise --max_steps to train longer"
    )
    assert f"eval loss {metrics['eval_loss']:.4f} nats/token" in captured.out  # its own results, printed again
    assert snapshot(output) == before  # no step, no checkpoint rotated, no file rewritten


def test_a_run_killed_after_its_last_checkpoint_finishes_without_another_step(corpus, finished, tmp_path):
    """No metrics.json (killed during the final evaluation): the rerun resumes from checkpoint-4 = max_steps; the
    Trainer alone would take a fifth step."""
    output = shutil.copytree(finished, tmp_path / "run")
    (output / "metrics.json").unlink()
    (output / "model.safetensors").unlink()
    assert main(command(corpus, output, 4)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["resumed_from"] == str(output / "checkpoint-4")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    weights, last = load_file(output / "model.safetensors"), load_file(output / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(weights[k], last[k]) for k in last)
    before = json.loads((finished / "metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)
    assert metrics["train_loss"] == pytest.approx(before["train_loss"])


def test_a_larger_max_steps_continues_to_the_weights_of_a_longer_run(corpus, finished, tmp_path):
    continued = shutil.copytree(finished, tmp_path / "continued")
    assert main(command(corpus, continued, 6)) == 0
    metrics = json.loads((continued / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["resumed_from"] == str(continued / "checkpoint-4")
    straight = tmp_path / "straight"
    assert main(command(corpus, straight, 6)) == 0
    weights, reference = load_file(continued / "model.safetensors"), load_file(straight / "model.safetensors")
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    assert metrics["train_loss"] == pytest.approx(json.loads((straight / "metrics.json").read_text())["train_loss"])


class PoisonDuringStep(TrainerCallback):
    """After the optimizer update of step `step` (its loss was finite), put a NaN in a weight or in Adam's state."""

    def __init__(self, step, target):
        self.step, self.target = step, target

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 != self.step:
            return
        with torch.no_grad():
            if self.target == "weight":
                model.transformer.ln_f.weight[0] = math.nan
            else:
                optimizer.state[model.transformer.ln_f.bias]["exp_avg"][1] = math.inf


@pytest.mark.parametrize(
    "step, target, named, last_good",
    [
        (4, "weight", "the weight transformer.ln_f.weight", "checkpoint-2"),
        (2, "optimizer state", "the optimizer state transformer.ln_f.bias.exp_avg", None),
    ],
)
def test_non_finite_weights_or_optimizer_state_are_never_saved(
    corpus, tmp_path, monkeypatch, capsys, step, target, named, last_good
):
    output = tmp_path / "run"
    arm(monkeypatch, PoisonDuringStep(step, target))
    assert main(command(corpus, output, 6)) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: step {step}: {named}")
    assert "is not finite (NaN or inf) after this step; stopped without saving it." in last_line
    if last_good:
        assert last_line.endswith(
            f"Last good checkpoint: {output / last_good}. Lower learning_rate or check the data, then rerun to resume"
            " from it"
        )
    else:
        assert last_line.endswith("No finite checkpoint to resume from: lower learning_rate or check the data, then"
                                  " rerun to start over")
    saved = sorted(p.name for p in output.glob("checkpoint-*"))
    assert saved == ([last_good] if last_good else [])  # the poisoned step was not saved
    assert not (output / "model.safetensors").exists() and not (output / "metrics.json").exists()


def poison_checkpoint(checkpoint):
    """A real safetensors file with one NaN, its header intact: only its values tell."""
    weights = load_file(checkpoint / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][3, 5] = math.nan
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_a_poisoned_checkpoint_is_skipped_on_resume_and_refused_by_name(corpus, finished, tmp_path, caplog, capsys):
    output = shutil.copytree(finished, tmp_path / "run")
    poisoned = output / "checkpoint-4"
    poison_checkpoint(poisoned)
    problem = f"{poisoned / 'model.safetensors'}: tensor transformer.h.0.mlp.c_fc.weight holds NaN or inf"
    assert checkpoint_problem(poisoned) == f"{problem} (a diverged run's checkpoint)"

    assert main([*command(corpus, output, 6), "--resume_from_checkpoint", str(poisoned)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: resume_from_checkpoint: {problem} (a diverged run's checkpoint)"
    )
    (output / "metrics.json").unlink()  # as if the run had been killed after writing checkpoint-4
    assert main(command(corpus, output, 6)) == 0
    assert f"ignoring checkpoint {poisoned}: {problem}" in caplog.text
    assert json.loads((output / "metrics.json").read_text())["resumed_from"] == str(output / "checkpoint-2")
