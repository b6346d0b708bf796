"""A disk that fills up while a checkpoint is written: one line saying the disk is full and naming the path, exit
code 3, the torn checkpoint removed, and the rerun resumes from the previous one.

Two ways to fill it: a patched write that fails with ENOSPC half-way through `optimizer.pt` (runs everywhere), and
a real 4 MB tmpfs that a callback fills up just before a save (needs the right to mount, e.g. root in a container)."""

import errno
import io
import json
import os
import re
import signal
import subprocess

import pytest
import torch
from transformers import TrainerCallback

import lmpipe.pretrain
from lmpipe.cli import main
from lmpipe.run.checkpoints import checkpoint_problem

from conftest import tiny_run, write_pydoc_corpus

pytestmark = pytest.mark.slow  # every test trains a tiny pretraining run

TINY = tiny_run(save_steps=2, logging_steps=1, validation_split_percentage=25, eval_strategy="no", max_steps=6)


def command(corpus, output):
    return ["pretrain", "--train_file", str(corpus), "--output_dir", str(output), *TINY]


def test_a_write_that_fails_for_space_is_one_line_and_leaves_no_torn_checkpoint(tmp_path, monkeypatch, capsys):
    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 12)
    output = tmp_path / "run"
    target = output / "checkpoint-4" / "optimizer.pt"
    save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if str(f) == str(target):  # half the file reaches the disk, then the disk is full
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            target.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    assert main(command(corpus, output)) == 3
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: disk full: cannot write {re.escape(str(target))} \([\d,]+ bytes free on its disk\); removed the"
        rf" unfinished {re.escape(str(output / 'checkpoint-4'))}; free some space, then rerun to resume from"
        rf" {re.escape(str(output / 'checkpoint-2'))}",
        last_line,
    ), last_line
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert checkpoint_problem(output / "checkpoint-2") is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's signal handlers are put back
    monkeypatch.undo()
    assert main(command(corpus, output)) == 0
    assert json.loads((output / "metrics.json").read_text())["resumed_from"] == str(output / "checkpoint-2")


class FillDiskAfter(TrainerCallback):
    """After step `step`, write a file until the disk has no space left, as another job sharing the disk would."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with open(self.path, "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the patched-write test covers it")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_is_one_line(small_disk, tmp_path, monkeypatch, capsys):
    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 12)
    output = small_disk / "run"
    build = lmpipe.pretrain.build_trainer

    def build_armed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(FillDiskAfter(3, small_disk / "filler"))
        return trainer

    monkeypatch.setattr(lmpipe.pretrain, "build_trainer", build_armed)
    assert main(command(corpus, output)) == 3
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: disk full: cannot write {output / 'checkpoint-4'}"), last_line
    assert last_line.endswith(f"free some space, then rerun to resume from {output / 'checkpoint-2'}")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
