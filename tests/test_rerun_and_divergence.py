"""Reruns are idempotent and a diverged run leaves no poisoned checkpoint.

- Rerunning a finished run's command trains nothing and touches no file (and a run killed after its last
  checkpoint finishes without a step past `max_steps`); a larger `max_steps` continues from the
  last checkpoint and ends with the weights of a run that was given that `max_steps` from the start (constant
  learning rate, so both runs see the same schedule).
- Non-finite weights or optimizer state after a step that is due to be saved stop the run without saving; the
  message names the newest finite checkpoint (or says there is none). A checkpoint on disk with a NaN tensor in
  its safetensors file is skipped on resume and refused as `resume_from_checkpoint`. A run that diverges right
  after resuming from a checkpoint with a finite but absurd weight names the one before it, and following that
  advice finishes.
- Every checkpoint and the final model carry a manifest (sha256 of each file, the step, the loss there): a finished
  run whose final model is not as saved is finished again from its last checkpoint, never reported as finished;
  `generate` and `check-loss` on it use that checkpoint; a checkpoint that passes the completeness checks but
  would not load is skipped; the finished run's metrics.json stays until a new attempt has loaded its checkpoint.
"""

import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from lmpipe.cli import main
from lmpipe.run.checkpoints import checkpoint_problem, saved_model_problem
from lmpipe.run.manifest import read_manifest, write_manifest

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


def test_every_checkpoint_and_the_final_model_carry_a_manifest_of_what_was_saved(finished, tmp_path):
    for folder in (finished / "checkpoint-2", finished / "checkpoint-4", finished):
        manifest = json.loads((folder / "lmpipe-manifest.json").read_text())
        state = json.loads((finished / "checkpoint-4" / "trainer_state.json").read_text())
        step = 4 if folder == finished else int(folder.name.split("-")[1])
        logged = [row["loss"] for row in state["log_history"] if row["step"] == step and "loss" in row]
        assert manifest["step"] == step and manifest["loss"] == logged[-1]
        names = {p.name for p in folder.iterdir() if p.is_file()} - {"lmpipe-manifest.json"}
        if folder == finished:  # the final model's files: what from_pretrained reads
            names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"}
        assert set(manifest["files"]) == names
        for name, recorded in manifest["files"].items():
            content = (folder / name).read_bytes()
            assert recorded == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}

    checkpoint = shutil.copytree(finished / "checkpoint-4", tmp_path / "checkpoint-4")
    weights = checkpoint / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-8] ^= 1  # the lowest mantissa bit of one weight: same size, header whole, finite
    weights.write_bytes(bytes(content))
    changed = f"{weights}: its sha256 differs from its manifest's (changed since it was saved)"
    assert checkpoint_problem(checkpoint) == changed
    (checkpoint / "lmpipe-manifest.json").unlink()  # as written by an older lmpipe: judged by the other checks alone
    assert checkpoint_problem(checkpoint) is None


def truncate(path):
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"{path}: {size // 2} bytes, not the {size} of its manifest (truncated or rewritten)"


def test_a_finished_run_whose_final_model_is_truncated_is_finished_again_from_its_last_checkpoint(
    corpus, finished, tmp_path, capsys, caplog
):
    output = shutil.copytree(finished, tmp_path / "run")
    problem = truncate(output / "model.safetensors")
    last = output / "checkpoint-4"
    fallback = f"{problem}; using {last}, the newest checkpoint that verifies"
    assert main(["generate", "--model_name_or_path", str(output), "--prompt", "The", "--max_new_tokens", "2"]) == 0
    assert main(["check-loss", str(output), "--batches", "1"]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [fallback, fallback]
    capsys.readouterr()

    refused = shutil.copytree(output, tmp_path / "no-checkpoint")
    for checkpoint in refused.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    assert main(command(corpus, refused, 4)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {problem.replace(str(output), str(refused))}; no checkpoint of this run verifies to finish it"
        f" again from: use another output_dir, or remove {refused} to train it from the start"
    )

    assert main(command(corpus, output, 4)) == 0
    assert f"{problem}: finishing the run again from {last}" in capsys.readouterr().err.splitlines()
    metrics, before = (json.loads((run / "metrics.json").read_text()) for run in (output, finished))
    assert metrics["train_steps"] == 4 and metrics["resumed_from"] == str(last)
    assert metrics["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)
    assert saved_model_problem(output) is None
    assert (output / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()


def rewrite_manifest(checkpoint):
    """As if the save itself had written the files as they are now (a writer's bug, not damage on disk)."""
    manifest = read_manifest(checkpoint)
    write_manifest(checkpoint, list(manifest["files"]), manifest["step"], manifest["loss"])


def drop_a_trainer_state_key(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["train_batch_size"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return f"{checkpoint / 'trainer_state.json'}: no train_batch_size (not a whole trainer state)"


def shrink_the_position_embeddings(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:16].clone()
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return (f"{checkpoint / 'model.safetensors'}: transformer.wpe.weight has shape [16, 32], but config.json makes it"
            " [32, 32]")


@pytest.mark.parametrize("damage", [drop_a_trainer_state_key, shrink_the_position_embeddings])
def test_a_checkpoint_that_would_not_load_is_skipped_for_the_previous_one(
    corpus, finished, tmp_path, damage, caplog
):
    output = shutil.copytree(finished, tmp_path / "run")
    newest = output / "checkpoint-4"
    problem = damage(newest)
    rewrite_manifest(newest)
    assert checkpoint_problem(newest) == problem
    assert main(command(corpus, output, 6)) == 0
    assert f"ignoring checkpoint {newest}: {problem}" in caplog.text
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["resumed_from"] == str(output / "checkpoint-2")


def test_a_finished_runs_metrics_stay_until_the_new_attempt_has_loaded_its_checkpoint(
    corpus, finished, tmp_path, monkeypatch
):
    output = shutil.copytree(finished, tmp_path / "run")
    metrics = (output / "metrics.json").read_text()

    def fails_to_load(self, *args, **kwargs):
        raise RuntimeError("the checkpoint does not load")

    monkeypatch.setattr(Trainer, "_load_from_checkpoint", fails_to_load)
    with pytest.raises(RuntimeError, match="does not load"):
        main(command(corpus, output, 6))
    assert (output / "metrics.json").read_text() == metrics


def test_a_run_that_diverges_right_after_resuming_names_the_checkpoint_before_and_finishes_from_it(
    corpus, finished, tmp_path, capsys
):
    """A finite but absurd weight (3e38) passes every check on disk, and its manifest matches (as if saved so)."""
    output = shutil.copytree(finished, tmp_path / "run")
    absurd, before = output / "checkpoint-4", output / "checkpoint-2"
    weights = load_file(absurd / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = 3e38
    save_file(weights, absurd / "model.safetensors", metadata={"format": "pt"})
    rewrite_manifest(absurd)
    assert checkpoint_problem(absurd) is None
    for _ in range(2):  # a plain rerun gives the same advice: it does not move on to a worse checkpoint
        assert main(command(corpus, output, 6)) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: step 5: the training loss is not finite (NaN or inf); stopped without saving it. Last good"
            f" checkpoint: {before} (not {absurd}: the run diverged 1 step(s) after resuming from it, so it is"
            f" suspect). Lower learning_rate or check the data, then rerun with --resume_from_checkpoint {before}"
        )
    assert main([*command(corpus, output, 6), "--resume_from_checkpoint", str(before)]) == 0  # the advice, followed
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["resumed_from"] == str(before)
    assert math.isfinite(metrics["eval_loss"])


def test_the_checkpoint_of_a_stopped_final_evaluation_is_sealed_by_its_manifest(tmp_path):
    """`save_last_step` calls the Trainer's `_save_checkpoint` directly: the callbacks' `on_save` must follow it."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler

    from lmpipe.training.callbacks import SealCheckpoint
    from lmpipe.training.loop import save_last_step

    def save(model, trial):  # the files of a checkpoint, trainer_state.json last
        checkpoint = tmp_path / "checkpoint-3"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"weights")
        (checkpoint / "trainer_state.json").write_text("{}")

    trainer = SimpleNamespace(
        args=TrainingArguments(output_dir=str(tmp_path)), state=TrainerState(global_step=3), control=TrainerControl(),
        callback_handler=CallbackHandler([SealCheckpoint()], None, None, None, None), model=None,
        _save_checkpoint=save,
    )
    save_last_step(trainer)
    manifest = read_manifest(tmp_path / "checkpoint-3")
    assert manifest is not None and manifest["step"] == 3
    assert sorted(manifest["files"]) == ["model.safetensors", "trainer_state.json"]
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
