"""One run per output directory: a second real process is refused while the first trains, naming its PID and
host; once the first is SIGKILLed, its lock file is stale and the next run trains."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from lmpipe.cli import main
from lmpipe.run.lock import LOCK_NAME

from conftest import REPO, tiny_run, write_pydoc_corpus

TINY = tiny_run(per_device_eval_batch_size=16, save_steps=1, logging_steps=1, validation_split_percentage=25)

# Test-only driver: `lmpipe pretrain`, which says when it has trained a step and then waits to be killed.
HOLDER = r"""
import sys, time
from transformers import TrainerCallback
import lmpipe.pretrain
from lmpipe.cli import main

class WaitAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print("training", flush=True)
        time.sleep(600)

build = lmpipe.pretrain.build_trainer
def build_armed(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(WaitAfterFirstStep())
    return trainer
lmpipe.pretrain.build_trainer = build_armed
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


@pytest.fixture
def corpus(tmp_path):
    return write_pydoc_corpus(tmp_path / "corpus.txt", 12)


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_directory(corpus, tmp_path, capsys):
    output = tmp_path / "run"
    args = ["--train_file", str(corpus), "--output_dir", str(output), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *args, "--max_steps", "5"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "training", holder.stderr.read()[-2000:]
        before = sorted(p.name for p in output.iterdir())
        assert main(["pretrain", *args, "--max_steps", "2"]) == 2
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert last_line == (
            f"error: output_dir {output} is in use by another run (PID {holder.pid} on host {socket.gethostname()});"
            " wait for it to finish or stop it, or use another output_dir"
        )
        assert sorted(p.name for p in output.iterdir()) == before  # the refused run touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stdout.close()
        holder.stderr.close()
    assert (output / LOCK_NAME).read_text().split()[0] == str(holder.pid)  # stale: left by the killed process
    assert main(["pretrain", *args, "--max_steps", "2"]) == 0  # the stale lock does not block
    assert not (output / LOCK_NAME).exists() and (output / "metrics.json").is_file()


def test_two_locks_in_one_process_conflict_and_release_frees_the_directory(tmp_path):
    """flock locks belong to an open file, so this process's second attempt is refused like another process's."""
    from lmpipe.errors import LmpipeError
    from lmpipe.run.lock import OutputDirLock

    first = OutputDirLock(str(tmp_path / "new" / "run"))
    with pytest.raises(LmpipeError, match=f"PID {os.getpid()} on host"):
        OutputDirLock(str(tmp_path / "new" / "run"))
    first.release()
    assert not (tmp_path / "new" / "run").exists()  # created for the run and left empty: removed again
    second = OutputDirLock(str(tmp_path / "new" / "run"))
    second.release()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["pretrain", "--output_dir", str(tmp_path / "taken"), "--report_to", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: output_dir {tmp_path / 'taken'}: is a file, not a directory"
    )


def test_a_lock_file_that_is_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / LOCK_NAME).mkdir(parents=True)
    assert main(["pretrain", "--output_dir", str(tmp_path / "run"), "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run' / LOCK_NAME}: is a directory, where lmpipe keeps its lock file:"
        " remove it, then rerun"
    )
    assert "Traceback" not in err
