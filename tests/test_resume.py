"""Kill a pretraining run and rerun the same command: it must end exactly where an uninterrupted run ends.

The killed runs are real subprocesses that SIGKILL themselves at a chosen moment (a test-only driver wraps the
library; no hook lives in lmpipe): after a checkpoint was written, and half-way through writing one (the driver
writes half of `optimizer.pt`, then dies). SIGTERM and a non-finite loss are exercised in-process.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lmpipe.cli import main
from lmpipe.loss.train_loss import mean_train_loss
from lmpipe.run.checkpoints import checkpoint_problem

from conftest import REPO, arm, tiny_run

MAX_STEPS, SAVE_STEPS = 14, 4
TINY_RUN = tiny_run(
    n_layer=2, dropout=0.1, max_steps=MAX_STEPS, per_device_eval_batch_size=16, learning_rate=0.003, warmup_steps=2,
    lr_scheduler_type="cosine", eval_strategy="steps", eval_steps=7, save_steps=SAVE_STEPS, logging_steps=1, seed=5,
    validation_split_percentage=25,
)  # dropout on, so the RNG state must be restored too; about 3 steps per epoch, so resumes land mid-epoch

# Test-only driver: the same command as `lmpipe pretrain`, armed to SIGKILL itself.
KILL_DRIVER = r"""
import io, os, signal, sys
import torch
from transformers import TrainerCallback
import lmpipe.pretrain
from lmpipe.cli import main

mode, step = sys.argv[1], int(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "after-checkpoint":
    class KillAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                die()

    build = lmpipe.pretrain.build_trainer
    def build_armed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(KillAtStep())
        return trainer
    lmpipe.pretrain.build_trainer = build_armed
else:  # "mid-checkpoint": die half-way through writing checkpoint-{step}/optimizer.pt
    save = torch.save
    def torn_save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join(f"checkpoint-{step}", "optimizer.pt")):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            die()
        return save(obj, f, *args, **kwargs)
    torch.save = torn_save
sys.exit(main(["pretrain", *sys.argv[3:]]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lmpipe.data.sources import pydoc_documents

    path = tmp_path_factory.mktemp("resume") / "corpus.txt"
    path.write_text("\n\n".join(pydoc_documents())[:1600], encoding="utf-8")
    return path



def command(corpus, output):
    return ["--train_file", str(corpus), "--output_dir", str(output), *TINY_RUN]


def outcome(output):
    """What must not depend on interruptions: metrics, per-step train losses, final weights."""
    metrics = json.loads((output / "metrics.json").read_text())
    history = json.loads((output / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    losses = {row["step"]: row["loss"] for row in history if "loss" in row}
    return metrics, losses, load_file(output / "model.safetensors"), history


def assert_same_run(resumed, reference):
    (metrics, losses, weights, _), (ref_metrics, ref_losses, ref_weights, ref_history) = outcome(resumed), reference
    for key in ("train_loss", "eval_loss", "perplexity"):
        assert abs(metrics[key] - ref_metrics[key]) <= 1e-4, key
    assert metrics["train_steps"] == MAX_STEPS and metrics["train_tokens"] == ref_metrics["train_tokens"]
    # tokens/s counts this session's tokens only: those after the resumed step, as the reference run logged them
    resumed_step = int(metrics["resumed_from"].rsplit("-", 1)[1]) if metrics["resumed_from"] else 0
    before = {row["step"]: row["num_input_tokens_seen"] for row in ref_history if "loss" in row}.get(resumed_step, 0)
    session_tokens = ref_metrics["train_tokens"] - before
    assert metrics["train_tokens_per_second"] * metrics["train_runtime_s"] == pytest.approx(session_tokens)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert max(abs(losses[step] - ref_losses[step]) for step in ref_losses) <= 1e-4
    assert weights.keys() == ref_weights.keys()
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) <= 1e-4


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """The uninterrupted run of the same command."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert main(["pretrain", *command(corpus, output)]) == 0
    return output


@pytest.fixture(scope="module")
def reference(reference_run):
    return outcome(reference_run)


def killed_run(corpus, output, mode, step):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, mode, str(step), *command(corpus, output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (output / "metrics.json").exists()


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_resumes_to_the_same_result(corpus, reference, tmp_path):
    output = tmp_path / "run"
    killed_run(corpus, output, "after-checkpoint", step=SAVE_STEPS + 2)  # steps 5 and 6 are lost and redone
    assert checkpoint_problem(output / f"checkpoint-{SAVE_STEPS}") is None
    assert main(["pretrain", *command(corpus, output)]) == 0
    assert json.loads((output / "metrics.json").read_text())["resumed_from"].endswith(f"checkpoint-{SAVE_STEPS}")
    assert_same_run(output, reference)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_falls_back_to_the_previous_one(corpus, reference, tmp_path, caplog):
    output = tmp_path / "run"
    torn = output / f"checkpoint-{2 * SAVE_STEPS}"
    killed_run(corpus, output, "mid-checkpoint", step=2 * SAVE_STEPS)
    assert (torn / "model.safetensors").exists() and not (torn / "trainer_state.json").exists()
    assert main(["pretrain", *command(corpus, output)]) == 0
    assert f"ignoring checkpoint {torn}: {torn / 'trainer_state.json'}: missing" in caplog.text
    assert json.loads((output / "metrics.json").read_text())["resumed_from"].endswith(f"checkpoint-{SAVE_STEPS}")
    assert_same_run(output, reference)


@pytest.mark.slow
def test_overwrite_replaces_another_run_and_the_same_recipe_still_resumes(corpus, reference_run, tmp_path, caplog):
    output = shutil.copytree(reference_run, tmp_path / "run")  # another run: 2 layers, checkpoints 12 and 14
    args = ["pretrain", *command(corpus, output), "--n_layer", "1", "--max_steps", "4"]
    assert main(args) == 2  # refused (tests/test_bad_inputs.py checks the message) and left alone
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-14"]
    assert main([*args, "--overwrite_output_dir", "true"]) == 0
    assert "removed another run's 2 checkpoint(s)" in caplog.text
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((output / "metrics.json").read_text())["resumed_from"] is None
    assert main([*args, "--overwrite_output_dir", "true", "--max_steps", "6"]) == 0  # its own run: continued
    assert json.loads((output / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-4")


class SendSignalAt(TrainerCallback):
    def __init__(self, signal_number, step):
        self.signal_number, self.step = signal_number, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signal_number)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_the_rerun_matches(corpus, reference, tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    arm(monkeypatch, SendSignalAt(signal.SIGTERM, step=6))  # during step 7, which is not a save step
    assert main(["pretrain", *command(corpus, output)]) == 128 + signal.SIGTERM
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == (
        f"error: stopped by SIGTERM after step 7: saved {output}/checkpoint-7; rerun the same command to resume from it"
    )
    assert checkpoint_problem(output / "checkpoint-7") is None and not (output / "metrics.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    assert main(["pretrain", *command(corpus, output)]) == 0
    assert json.loads((output / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-7")
    assert_same_run(output, reference)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(corpus, tmp_path, monkeypatch):
    output = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started as a background job
    arm(monkeypatch, SendSignalAt(signal.SIGINT, step=2))
    assert main(["pretrain", *command(corpus, output)]) == 130
    assert checkpoint_problem(output / "checkpoint-3") is None
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


class SendSignalAgainAtStepEnd(SendSignalAt):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step + 1:
            os.kill(os.getpid(), self.signal_number)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGUSR2, signal.SIGXCPU], ids=lambda stop: stop.name)
def test_usr2_and_xcpu_save_a_checkpoint_and_exit_128_plus_the_signal(stop, corpus, tmp_path, monkeypatch, capsys):
    """LSF's and SGE's warnings before a kill, and a CPU-time limit. The kernel repeats SIGXCPU every CPU second:
    a repeat is no second signal that stops at once. (HUP and USR1 go through `lmpipe launch` in
    tests/test_launch_signals.py.) This test's own handler stands in for the default action, which would end the
    test's process: without lmpipe's, it records the signal and the run trains to the end."""
    output, received = tmp_path / "run", []

    def record(number, frame):
        received.append(number)

    previous = signal.signal(stop, record)
    try:
        monkeypatch.setattr("lmpipe.run.signals.SAME_STOP_WITHIN_S", 0.0)  # any repeat would count as insisting
        arm(monkeypatch, (SendSignalAgainAtStepEnd if stop == signal.SIGXCPU else SendSignalAt)(stop, step=2))
        assert main(["pretrain", *command(corpus, output)]) == 128 + stop
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: stopped by {stop.name} after step 3: saved {output}/checkpoint-3; rerun the same command to"
            " resume from it"
        )
        assert checkpoint_problem(output / "checkpoint-3") is None and received == []
        assert signal.getsignal(stop) is record  # put back
    finally:
        signal.signal(stop, previous)


class PoisonWeightsAfter(TrainerCallback):
    """Make every later forward pass produce NaN, as a diverging run does."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.transformer.ln_f.weight.fill_(math.nan)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    corpus, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "run"
    arm(monkeypatch, PoisonWeightsAfter(step=5))
    assert main(["pretrain", *command(corpus, output)]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: step 6: the training loss is not finite")
    assert f"Last good checkpoint: {output / f'checkpoint-{SAVE_STEPS}'}." in last_line
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}"]
    assert checkpoint_problem(output / f"checkpoint-{SAVE_STEPS}") is None
    assert not (output / "metrics.json").exists() and not (output / "model.safetensors").exists()


DAMAGES = {
    "model.safetensors truncated": ("model.safetensors", lambda b: b[: len(b) // 2], "incomplete metadata"),
    "model.safetensors header garbage": ("model.safetensors", lambda b: b[:8] + b"#" * 16 + b[24:], "invalid JSON"),
    "optimizer.pt truncated": ("optimizer.pt", lambda b: b[: len(b) // 2], "damaged or incomplete"),
    "optimizer.pt one bit flipped": ("optimizer.pt", lambda b: b[:800] + bytes([b[800] ^ 1]) + b[801:], "CRC"),
    "trainer_state.json truncated": ("trainer_state.json", lambda b: b[:-20], "damaged or incomplete"),
    "rng_state.pth missing": ("rng_state.pth", None, "no rng_state"),
    "scheduler.pt missing": ("scheduler.pt", None, "no scheduler.pt"),
    "trainer_state.json missing": ("trainer_state.json", None, "not finished"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_as_incomplete(damage, reference_run, tmp_path):
    checkpoint = shutil.copytree(reference_run / f"checkpoint-{MAX_STEPS}", tmp_path / f"checkpoint-{MAX_STEPS}")
    assert checkpoint_problem(checkpoint) is None
    name, mutate, reason = DAMAGES[damage]
    target = checkpoint / name
    if mutate is None:
        target.unlink()
    else:
        target.write_bytes(mutate(target.read_bytes()))
    problem = checkpoint_problem(checkpoint)
    assert problem is not None and reason in problem and str(checkpoint) in problem


def test_mean_train_loss_weights_each_logged_window_by_its_steps():
    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 1.0, "step": 3}, {"train_loss": 7}]
    assert mean_train_loss(history) == pytest.approx((4.0 * 2 + 1.0) / 3)
    assert mean_train_loss([{"eval_loss": 1.0, "step": 1}]) is None


def test_generation_and_merge_settings_do_not_make_a_qa_rerun_another_run(tmp_path):
    """They act after training: changing them resumes (and re-evaluates); a data setting does not."""
    from lmpipe.config.arguments import FINETUNE_QA_GROUPS
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.run.files import write_resolved_recipe
    from lmpipe.run.identity import identity_changes

    base = ["--model_name_or_path", "m", "--train_file", "qa.jsonl", "--use_lora", "true",
            "--output_dir", str(tmp_path)]
    write_resolved_recipe(parse_recipe(base, groups=FINETUNE_QA_GROUPS), str(tmp_path))
    after_training = ["--generation_max_new_tokens", "32", "--merge_lora", "true", "--learning_rate", "1e-4"]
    assert identity_changes(parse_recipe(base + after_training, groups=FINETUNE_QA_GROUPS), str(tmp_path)) == []
    other_rows = parse_recipe(base + ["--max_length", "64"], groups=FINETUNE_QA_GROUPS)
    assert identity_changes(other_rows, str(tmp_path)) == ["max_length 128 -> 64"]
