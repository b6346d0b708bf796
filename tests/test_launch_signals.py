"""`lmpipe launch` (accelerate launch's options, with signals and exit codes passed through), as a scheduler meets
it: a real launcher process with one or two real training processes, a real SIGTERM or SIGINT sent to the
launcher's PID only. Every training process saves the same complete checkpoint and exits; the launcher returns
their exit code (143 / 130) only after they are gone; the checkpoint resumes. An error keeps its code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmpipe.cli import main
from lmpipe.run.checkpoints import checkpoint_problem

from conftest import REPO, tiny_run, write_pydoc_corpus

pytestmark = pytest.mark.slow  # lmpipe launch subprocesses, signalled

TINY = tiny_run(save_steps=2, logging_steps=1, validation_split_percentage=25, eval_strategy="no", use_cpu=True, seed=1)
LAUNCH = {1: ["--num_processes", "1"], 2: ["--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml")]}
# What the launcher starts: a script of pipelines/, or a command by name (`python -m lmpipe pretrain` per process).
SCRIPT = {1: "pipelines/pretrain.py", 2: "pretrain"}


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


def launch(processes, args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmpipe", "launch", *LAUNCH[processes], SCRIPT[processes], *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs,
    )


@pytest.fixture
def left_running():
    """PIDs a test started: whatever of them still runs at teardown is killed, so a failing test never leaves a
    trainer of --max_steps 100000 running (and a suite waiting on it)."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("processes, stop", [(1, signal.SIGTERM), (2, signal.SIGINT)])
def test_a_signal_to_the_launcher_saves_on_every_rank_and_returns_their_code(processes, stop, tmp_path, left_running):
    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 12)
    output = tmp_path / "run"
    args = ["--train_file", str(corpus), "--output_dir", str(output), *TINY]
    launcher = launch(processes, [*args, "--max_steps", "100000"])
    left_running.add(launcher.pid)
    deadline = time.monotonic() + 240
    # Training, past its first save: any checkpoint (save_total_limit rotates checkpoint-2 away within a second).
    while not list(output.glob("checkpoint-*/trainer_state.json")):
        left_running.update(descendants(launcher.pid))
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]  # it ended: its stderr is complete
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.2)
    started = descendants(launcher.pid)
    left_running.update(started)
    assert len(started) >= processes
    os.kill(launcher.pid, stop)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 128 + stop, err[-3000:]
    assert not [pid for pid in started if alive(pid)]  # nothing left running
    stopped = [line for line in err.splitlines() if line.startswith("error: stopped by")]
    assert len(stopped) == processes and len(set(stopped)) == 1  # every rank, the same step
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert stopped[0] == (
        f"error: stopped by {stop.name} after step {step}: saved {output}/checkpoint-{step};"
        " rerun the same command to resume from it"
    )
    assert "Traceback" not in err
    assert checkpoint_problem(output / f"checkpoint-{step}") is None
    assert len(list((output / f"checkpoint-{step}").glob("rng_state*.pth"))) == processes
    if processes == 1:  # and it resumes from there (a two-rank resume is tests/test_two_ranks.py's subject)
        assert main(["pretrain", *args, "--max_steps", str(step + 1)]) == 0
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["resumed_from"] == str(output / f"checkpoint-{step}") and metrics["train_steps"] == step + 1


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
