"""`lmpipe launch` (accelerate launch's options, with signals and exit codes passed through), as a scheduler meets
it: a real launcher process with one or two real training processes, a real signal (TERM, INT, HUP, USR1) sent to
the launcher's PID only. Every training process saves the same complete checkpoint and exits; the launcher returns
their exit code (128 + the signal) only after they are gone; the checkpoint resumes. A signal during the final
evaluation stops it, and the rerun evaluates without training. A rank killed by SIGKILL is named in one line. An
error keeps its code."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmpipe.cli import main
from lmpipe.run.checkpoints import checkpoint_problem
from lmpipe.run.lock import LOCK_NAME
from lmpipe.run.manifest import MANIFEST_NAME

from conftest import REPO, tiny_run, write_pydoc_corpus

pytestmark = pytest.mark.slow  # lmpipe launch subprocesses, signalled

TINY = tiny_run(save_steps=2, logging_steps=1, validation_split_percentage=25, eval_strategy="no", use_cpu=True, seed=1)
# Two processes from a config file, or from `--num_processes 2` alone (without a GPU, Accelerate would start one).
LAUNCH = {
    1: ["--num_processes", "1"],
    2: ["--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml")],
    "2 without a config": ["--num_processes", "2"],
}
# What the launcher starts: a script of pipelines/, or a command by name (`python -m lmpipe pretrain` per process).
SCRIPT = {1: "pipelines/pretrain.py", 2: "pretrain", "2 without a config": "pretrain"}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def launch(processes, args, script=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmpipe", "launch", *LAUNCH[processes], script or SCRIPT[processes], *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def wait_for_a_checkpoint(launcher, output, left_running):
    """Training, past its first save: any checkpoint (save_total_limit rotates checkpoint-2 away within a second)."""
    deadline = time.monotonic() + 240
    while not list(output.glob("checkpoint-*/trainer_state.json")):
        left_running.update(descendants(launcher.pid))
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]  # it ended: its stderr is complete
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.2)
    started = descendants(launcher.pid)
    left_running.update(started)
    return started


@pytest.fixture
def left_running():
    """PIDs a test started: whatever of them still runs at teardown is killed, so a failing test never leaves a
    trainer of --max_steps 100000 running (and a suite waiting on it)."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "processes, stop",
    [(1, signal.SIGTERM), (2, signal.SIGINT), (1, signal.SIGHUP), ("2 without a config", signal.SIGUSR1)],
    ids=["1-SIGTERM", "2-SIGINT", "1-SIGHUP", "2-without-a-config-SIGUSR1"],
)
def test_a_signal_to_the_launcher_saves_on_every_rank_and_returns_their_code(processes, stop, tmp_path, left_running):
    """HUP: the terminal closed; USR1: SLURM's `--signal=USR1@...` (saves and exits too, see docs/reliability.md).
    USR2 and XCPU take the same path (tests/test_resume.py sends each in-process)."""
    ranks = 1 if processes == 1 else 2
    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 12)
    output = tmp_path / "run"
    args = ["--train_file", str(corpus), "--output_dir", str(output), *TINY]
    launcher = launch(processes, [*args, "--max_steps", "100000"])
    left_running.add(launcher.pid)
    started = wait_for_a_checkpoint(launcher, output, left_running)
    assert len(started) >= ranks
    os.kill(launcher.pid, stop)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 128 + stop, err[-3000:]
    assert not [pid for pid in started if alive(pid)]  # nothing left running
    stopped = [line for line in err.splitlines() if line.startswith("error: stopped by")]
    assert len(stopped) == ranks and len(set(stopped)) == 1  # every rank, the same step
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert stopped[0] == (
        f"error: stopped by {stop.name} after step {step}: saved {output}/checkpoint-{step};"
        " rerun the same command to resume from it"
    )
    assert "Traceback" not in err
    assert "were not passed to `accelerate launch`" not in err  # without a config file, lmpipe gives its defaults
    assert checkpoint_problem(output / f"checkpoint-{step}") is None
    assert len(list((output / f"checkpoint-{step}").glob("rng_state*.pth"))) == ranks
    assert not (output / LOCK_NAME).exists()  # released, not left stale
    if stop == signal.SIGTERM:  # and it resumes from there (a two-rank resume is tests/test_two_ranks.py's subject)
        assert main(["pretrain", *args, "--max_steps", str(step + 1)]) == 0
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["resumed_from"] == str(output / f"checkpoint-{step}") and metrics["train_steps"] == step + 1


def test_a_rank_killed_by_sigkill_is_one_line_naming_it(tmp_path, left_running):
    """The other rank fails in a gloo collective ("Connection reset by peer", a long traceback): under `lmpipe
    launch` it says nothing, and the launcher names the rank, its PID and the signal."""
    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 12)
    output = tmp_path / "run"
    launcher = launch(2, ["--train_file", str(corpus), "--output_dir", str(output), *TINY, "--max_steps", "100000"])
    left_running.add(launcher.pid)
    started = wait_for_a_checkpoint(launcher, output, left_running)
    ranks = {}
    for pid in started:
        with contextlib.suppress(OSError):
            environment = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            ranks.update({int(v.split(b"=")[1]): pid for v in environment if v.startswith(b"RANK=")})
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert not [pid for pid in started if alive(pid)]
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [
        f"error: rank 1 (PID {ranks[1]}) was killed by SIGKILL (the out-of-memory killer, or kill -9); the other"
        " ranks stopped: rerun the same command to resume from the newest complete checkpoint"
    ], err[-3000:]


# Test-only training script: `lmpipe pretrain` that sends SIGTERM to its launcher once the final evaluation runs,
# and waits for the forwarded signal to arrive.
SIGNAL_IN_THE_FINAL_EVALUATION = r"""
import os, signal, sys, time
from transformers import TrainerCallback
import lmpipe.pretrain
from lmpipe.cli import main

class SignalTheLauncher(TrainerCallback):
    trained = False

    def on_train_end(self, args, state, control, **kwargs):
        self.trained = True

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.trained:
            self.trained = False
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(2)

build = lmpipe.pretrain.build_trainer
def build_armed(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(SignalTheLauncher())
    return trainer
lmpipe.pretrain.build_trainer = build_armed
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_a_signal_in_the_final_evaluation_stops_it_and_the_rerun_only_evaluates(tmp_path, left_running, capsys):
    """save_strategy no: the last step is saved when the final evaluation is stopped, so the rerun resumes there
    and evaluates (no step, no "finished" without metrics.json), as the uninterrupted run does."""
    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 12)
    script = tmp_path / "signal_in_the_final_evaluation.py"
    script.write_text(SIGNAL_IN_THE_FINAL_EVALUATION)
    output, reference = tmp_path / "run", tmp_path / "reference"
    args = ["--train_file", str(corpus), *TINY, "--save_strategy", "no", "--max_steps", "3"]
    launcher = launch(1, [*args, "--output_dir", str(output)], script=str(script))
    left_running.add(launcher.pid)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM during the final evaluation: training had finished, saved in {output}/checkpoint-3;"
        " rerun the same command to evaluate it (no more training)"
    )
    assert "Traceback" not in err
    assert checkpoint_problem(output / "checkpoint-3") is None and not (output / "metrics.json").exists()
    assert (output / "checkpoint-3" / MANIFEST_NAME).is_file()  # sealed as the Trainer's own saves are
    capsys.readouterr()
    assert main(["pretrain", *args, "--output_dir", str(output)]) == 0
    assert "nothing to train" not in capsys.readouterr().err
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(output / "checkpoint-3") and metrics["train_runtime_s"] == 0.0
    assert main(["pretrain", *args, "--output_dir", str(reference)]) == 0
    expected = json.loads((reference / "metrics.json").read_text())
    for key in ("eval_loss", "eval_tokens", "train_steps", "train_tokens", "train_loss"):  # other thread counts
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    trained, uninterrupted = load_file(output / "model.safetensors"), load_file(reference / "model.safetensors")
    assert max((trained[name] - uninterrupted[name]).abs().max().item() for name in uninterrupted) <= 1e-5


@pytest.mark.parametrize("script", [str(REPO / "pipelines" / "pretrain.py"), "pretrain"])
def test_an_error_under_the_launcher_keeps_its_code_and_one_line(script, tmp_path, capfd):
    """The launcher runs in this test's process (the trainer is a real child), to spare a second interpreter; the
    script is a pipelines/ file or the command's name."""
    argv = ["launch", *LAUNCH[1], script, "--n_layer", "-1", "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1] == "error: n_layer must be >= 1, got -1"
    assert "Traceback" not in err and "CalledProcessError" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the launcher's forwarding is undone
