"""Fault battery: issue 24's list of faults, each a tiny real run on this CPU, classified CLEAN / NOISY / WRONG.

Not a speed figure. Every case states its expected outcome (exit code, a stderr line containing some text, a
checkpoint present, ...), so the classification is mechanical:

- WRONG: the outcome is not the expected one (wrong exit code, missing line, no checkpoint, training continued on
  what it should have refused, ...);
- NOISY: the expected outcome, but a traceback or more than one line of error output on stderr (progress bars,
  the Trainer's log lines, library warnings and lmpipe's "SIGTERM: saving ..." notice are not error output);
- CLEAN: otherwise.

One tiny pretraining run (4 steps, checkpoints at 2 and 4) is trained once and copied by the cases that resume or
break it. Cases about processes run through `lmpipe launch` with 1 and 2 processes (gloo on CPU). Prints a table,
then one JSON line with every case and the counts.

    HF_HUB_OFFLINE=1 python benchmarks/fault_battery.py [--only W1,noisy] [--processes 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit_json, load_average, machine, print_table  # noqa: E402

TINY = [
    "--train_tokenizer", "true", "--tokenizer_vocab_size", "300", "--block_size", "32", "--n_positions", "32",
    "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
    "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "1", "--save_steps", "2", "--logging_steps", "1",
    "--eval_strategy", "no", "--validation_split_percentage", "25",
]
LAUNCH = {1: ["launch", "--num_processes", "1"],
          2: ["launch", "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml")]}
FINETUNE = ["--max_length", "32", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
            "--max_steps", "1", "--eval_strategy", "no"]
# stderr lines that are not error output: progress bars, the Trainer's log dicts, library warnings (transformers',
# torch's `W1205 ...`, DDP's `[rank0]:[W...`) and lmpipe's notice that a signal arrived (`SIGTERM: saving ...`)
NOT_ERROR_OUTPUT = re.compile(
    r"it/s\]|examples/s\]|%\||^\{'|^\s*$|^\[transformers\] |^[WI]\d{4} |^\[rank\d+\]:\[W|^SIG[A-Z0-9]+: "
)
TIMEOUT_S = 300


@dataclass
class Outcome:
    """What a case saw: the exit code, the output, and why it is WRONG (None: the expected outcome)."""

    rc: int | None
    stdout: str
    stderr: str
    wrong: str | None = None


@dataclass
class Case:
    name: str
    issue: str  # W1..W7, Also, noisy
    expected: str
    run: Callable[[Path, Path], Outcome]  # (its own directory, the shared root) -> outcome
    processes: int = 1
    result: dict = field(default_factory=dict)


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}  # a background run's log lines reach its file as they are printed


def lmpipe(args: list[str], cwd: Path, timeout: float = TIMEOUT_S) -> Outcome:
    try:
        done = subprocess.run([sys.executable, "-m", "lmpipe", *map(str, args)], cwd=cwd, env=env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return Outcome(None, e.stdout or "", e.stderr or "", f"no exit within {timeout:.0f} s")
    return Outcome(shell_code(done.returncode), done.stdout, done.stderr)


def shell_code(returncode: int) -> int:
    """The exit code a shell shows: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not NOT_ERROR_OUTPUT.search(line.split("\r")[-1])]


def line_with(stderr: str, *texts: str) -> str | None:
    return next((line for line in stderr.splitlines() if all(t in line for t in texts)), None)


def expect(out: Outcome, rc: int | None = None, *texts: str, wrong: str | None = None) -> Outcome:
    """Set `out.wrong` when the exit code is not `rc` or no stderr line holds every one of `texts`."""
    if out.wrong is None and rc is not None and out.rc != rc:
        out.wrong = f"exit {out.rc}, expected {rc}"
    elif out.wrong is None and texts and line_with(out.stderr, *texts) is None:
        out.wrong = f"no line with {' + '.join(map(repr, texts))}"
    elif out.wrong is None:
        out.wrong = wrong
    return out


def classify(out: Outcome) -> str:
    if out.wrong:
        return "WRONG"
    lines = error_lines(out.stderr)
    return "NOISY" if "Traceback" in out.stderr or len(lines) > 1 else "CLEAN"


# ---- the shared tiny run and its copies


def train_base(root: Path) -> None:
    from lmpipe.data.sources import pydoc_documents

    (root / "corpus.txt").write_text("\n\n".join(pydoc_documents()[:30]), encoding="utf-8")
    out = lmpipe(["pretrain", "--train_file", root / "corpus.txt", "--output_dir", root / "base", *TINY,
                  "--max_steps", "4"], root)
    if out.rc != 0:
        sys.exit(f"the shared tiny run failed (exit {out.rc}):\n{out.stderr[-3000:]}")


def copy_base(root: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(root / "base", tmp / "run"))


def resume(root: Path, run: Path, *flags: str) -> Outcome:
    """The base run's command with `run` as output_dir, `flags` after it (a larger max_steps resumes)."""
    return lmpipe(["pretrain", "--train_file", root / "corpus.txt", "--output_dir", run, *TINY, *flags], root)


def metrics(run: Path) -> dict:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def complete(checkpoint: Path) -> bool:
    from lmpipe.run.checkpoints import checkpoint_problem

    return checkpoint.is_dir() and checkpoint_problem(checkpoint) is None


# ---- processes and signals


def descendants(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
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


def rank_of(pid: int) -> int | None:
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [v.split(b"=", 1)[1] for v in variables if v.startswith(b"RANK=")]
    return int(found[0]) if found else None


class Launched:
    """A background lmpipe process (stdout and stderr to files); every process it started is killed on exit."""

    def __init__(self, args: list, cwd: Path):
        self.out, self.err = open(cwd / "stdout.txt", "w+"), open(cwd / "stderr.txt", "w+")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "lmpipe", *map(str, args)], cwd=cwd, env=env(),
                                        stdout=self.out, stderr=self.err, text=True)
        self.started: set[int] = set()

    def watch(self) -> None:
        self.started |= descendants(self.process.pid)

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.watch()
            if condition():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def finish(self, timeout: float) -> Outcome:
        try:
            rc = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        for pid in [self.process.pid, *self.started]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.out.seek(0), self.err.seek(0)
        code = None if rc is None else shell_code(rc)
        outcome = Outcome(code, self.out.read(), self.err.read(), None if rc is not None else "no exit in time")
        self.out.close(), self.err.close()
        return outcome


def checkpoints(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def signalled(processes: int, signum: signal.Signals) -> Callable[[Path, Path], Outcome]:
    """Training under `lmpipe launch`, past its first checkpoint, then `signum` to the launcher: every rank saves a
    complete checkpoint and exits 128 + signum with one line (or, for USR1, saves and keeps training)."""

    def run(tmp: Path, root: Path) -> Outcome:
        output = tmp / "run"
        job = Launched([*LAUNCH[processes], "pretrain", "--train_file", root / "corpus.txt", "--output_dir", output,
                        *TINY, "--max_steps", "100000"], tmp)
        if not job.wait_for(lambda: bool(list(output.glob("checkpoint-*/trainer_state.json"))), TIMEOUT_S):
            return expect(job.finish(10), wrong="no checkpoint before the signal")
        before = {p.name for p in checkpoints(output)}
        sent = time.monotonic()
        os.kill(job.process.pid, signum)
        if signum == signal.SIGUSR1 and job.wait_for(lambda: bool({p.name for p in checkpoints(output)} - before), 60):
            with contextlib.suppress(subprocess.TimeoutExpired):  # saving and exiting takes a few seconds
                job.process.wait(timeout=30)
            if job.process.poll() is None:  # saved and goes on (the SLURM requeue convention): stop it
                new = sorted({p.name for p in checkpoints(output)} - before)
                os.kill(job.process.pid, signal.SIGTERM)
                out = expect(job.finish(120), None, "SIGUSR1")  # a line says it saved on USR1
                if out.wrong is None and not complete(output / new[0]):
                    out.wrong = f"{new[0]} incomplete after USR1"
                return out
        out = job.finish(max(10.0, 180 - (time.monotonic() - sent)))
        expect(out, 128 + signum, f"stopped by {signum.name}")
        saved = re.search(r"saved (\S+?);", line_with(out.stderr, f"stopped by {signum.name}") or "")
        if out.wrong is None and not (saved and complete(Path(saved.group(1)))):
            out.wrong = "no complete checkpoint named"
        return out

    return run


def rank_killed(tmp: Path, root: Path) -> Outcome:
    """2 processes, rank 1 SIGKILLed after the first checkpoint: no hang, one line naming the rank."""
    output = tmp / "run"
    job = Launched([*LAUNCH[2], "pretrain", "--train_file", root / "corpus.txt", "--output_dir", output, *TINY,
                    "--max_steps", "100000"], tmp)
    if not job.wait_for(lambda: bool(list(output.glob("checkpoint-*/trainer_state.json"))), TIMEOUT_S):
        return expect(job.finish(10), wrong="no checkpoint before the kill")
    victim = next((pid for pid in job.started if alive(pid) and rank_of(pid) == 1), None)
    if victim is None:
        return expect(job.finish(10), wrong="no rank 1 process found")
    os.kill(victim, signal.SIGKILL)
    out = job.finish(120)
    if out.rc in (0, None):
        out.wrong = out.wrong or f"exit {out.rc} after a rank died"
    return expect(out, None, "rank 1")


def final_evaluation_stopped(tmp: Path, root: Path) -> Outcome:
    """SIGTERM once training is over and the final evaluation runs: exit 143 with one line; the rerun evaluates."""
    from lmpipe.data.sources import pydoc_documents

    (tmp / "valid.txt").write_text("\n\n".join(pydoc_documents()[30:150]), encoding="utf-8")
    output = tmp / "run"
    args = ["pretrain", "--train_file", root / "corpus.txt", "--validation_file", tmp / "valid.txt",
            "--output_dir", output, *TINY[:-2], "--max_steps", "2", "--per_device_eval_batch_size", "1"]
    job = Launched(args, tmp)
    if not job.wait_for(lambda: "train_runtime" in (tmp / "stdout.txt").read_text(), TIMEOUT_S):
        return expect(job.finish(60), wrong="the run ended before its final evaluation could be signalled")
    job.process.send_signal(signal.SIGTERM)
    out = expect(job.finish(120), 143, "SIGTERM")
    if out.wrong is None:
        rerun = lmpipe(args, tmp)
        if rerun.rc != 0 or "eval_loss" not in metrics(output):
            out.wrong = f"the rerun did not finish the evaluation (exit {rerun.rc})"
    return out


def launch_two_without_config(tmp: Path, root: Path) -> Outcome:
    """`lmpipe launch --num_processes 2` with no config file: two ranks, or one line saying why not."""
    out = lmpipe(["launch", "--num_processes", "2", "pretrain", "--train_file", root / "corpus.txt",
                  "--output_dir", tmp / "run", *TINY, "--max_steps", "2"], tmp)
    if out.rc != 0:
        return expect(out, None, "num_processes")
    recorded = tmp / "run" / "identity.json"
    ranks = json.loads(recorded.read_text())["settings"].get("world_size") if recorded.is_file() else None
    return expect(out, 0, wrong=None if ranks == 2 else f"exit 0 with {ranks} process(es), not 2 and no line")


# ---- resumes of the shared run


def learning_rate_changed(tmp: Path, root: Path) -> Outcome:
    """Resume with --learning_rate 1e-4: every rate logged after the resume is at most 1e-4."""
    run = copy_base(root, tmp)
    (run / "metrics.json").unlink()
    out = expect(resume(root, run, "--max_steps", "6", "--learning_rate", "1e-4"), 0)
    state = run / "checkpoint-6" / "trainer_state.json"
    if out.wrong is None:
        rates = [row["learning_rate"] for row in json.loads(state.read_text())["log_history"]
                 if row.get("step", 0) > 4 and "learning_rate" in row]
        if not rates or max(rates) > 1e-4 * (1 + 1e-6):
            out.wrong = f"learning rates after the resume: {rates}"
    return out


def data_replaced(tmp: Path, root: Path) -> Outcome:
    """The data file replaced under the same path, then resumed: refused in one line naming the file."""
    run = copy_base(root, tmp)
    corpus = root / "corpus.txt"
    text = corpus.read_text(encoding="utf-8")
    try:
        corpus.write_text(text[len(text) // 2:] + text[: len(text) // 2], encoding="utf-8")
        return expect(resume(root, run, "--max_steps", "6"), 2, "corpus.txt")
    finally:
        corpus.write_text(text, encoding="utf-8")


def resumed_with(*flags: str, key: str) -> Callable[[Path, Path], Outcome]:
    """A batch-geometry change on resume: refused in one line naming `key`."""

    def run(tmp: Path, root: Path) -> Outcome:
        return expect(resume(root, copy_base(root, tmp), "--max_steps", "6", *flags), 2, key)

    return run


def resumed_on_two_processes(tmp: Path, root: Path) -> Outcome:
    """A 1-process run resumed on 2 processes: refused in one line naming the processes / world size."""
    run = copy_base(root, tmp)
    out = lmpipe([*LAUNCH[2], "pretrain", "--train_file", root / "corpus.txt", "--output_dir", run, *TINY,
                  "--max_steps", "6"], root)
    if out.rc == 0:
        out.wrong = "resumed on another number of processes"
    elif not re.search(r"process|world", "\n".join(error_lines(out.stderr)), re.IGNORECASE):
        out.wrong = "no line naming the processes"
    return out


def absurd_weight(tmp: Path, root: Path) -> Outcome:
    """checkpoint-4 holds a finite but absurd weight (3e38): it is not named 'last good'; the run falls back to
    checkpoint-2 or stops naming checkpoint-2."""
    from safetensors.torch import load_file, save_file

    run = copy_base(root, tmp)
    (run / "metrics.json").unlink()
    weights_file = run / "checkpoint-4" / "model.safetensors"
    weights = load_file(weights_file)
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = 3e38
    save_file(weights, weights_file, metadata={"format": "pt"})
    out = resume(root, run, "--max_steps", "8")
    if line_with(out.stderr.lower(), "checkpoint-4", "last good"):
        out.wrong = "checkpoint-4 named last good"
    elif out.rc == 0:
        resumed = metrics(run).get("resumed_from", "")
        out.wrong = None if resumed.endswith("checkpoint-2") else f"trained on from {resumed}"
    else:
        expect(out, None, "checkpoint-2")
    return out


def truncated_final_model(tmp: Path, root: Path) -> Outcome:
    """A finished run whose model.safetensors is cut in half, rerun: repaired (loads afterwards) or refused naming
    the file; never 'finished, nothing to train'."""
    from safetensors import safe_open

    run = copy_base(root, tmp)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = resume(root, run, "--max_steps", "4")
    if out.rc == 0:
        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open is the fault
            out.wrong = "exit 0 with a truncated model.safetensors"
        return out
    return expect(out, None, "model.safetensors")


def truncated_final_model_pushed(tmp: Path, root: Path) -> Outcome:
    """`lmpipe push` of that run: refused before any upload, naming the file."""
    run = copy_base(root, tmp)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return expect(lmpipe(["push", run, "--hub_model_id", "someone/tiny"], tmp), 2, "model.safetensors")


def broken_checkpoint(damage: str) -> Callable[[Path, Path], Outcome]:
    """checkpoint-4 passes the completeness check but does not load: the resume falls back to checkpoint-2 with a
    line naming checkpoint-4."""

    def run(tmp: Path, root: Path) -> Outcome:
        run_dir = copy_base(root, tmp)
        (run_dir / "metrics.json").unlink()
        checkpoint = run_dir / "checkpoint-4"
        if damage == "state":
            (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": []}))
        else:
            config = json.loads((checkpoint / "config.json").read_text())
            config["n_embd"] *= 2
            (checkpoint / "config.json").write_text(json.dumps(config))
        out = expect(resume(root, run_dir, "--max_steps", "6"), 0, "checkpoint-4")
        if out.wrong is None and not metrics(run_dir).get("resumed_from", "").endswith("checkpoint-2"):
            out.wrong = f"resumed from {metrics(run_dir).get('resumed_from')}"
        return out

    return run


def lock_is_a_directory(tmp: Path, root: Path) -> Outcome:
    (tmp / "run" / ".lmpipe.lock").mkdir(parents=True)
    return expect(resume(root, tmp / "run", "--max_steps", "2"), 2, ".lmpipe.lock")


def evaluate_missing_directory(tmp: Path, root: Path) -> Outcome:
    out = expect(lmpipe(["evaluate", "./no-such-model", "--task", "perplexity", "--data", root / "corpus.txt"], tmp),
                 2, "no such local directory")
    line = line_with(out.stderr, "no such local directory") or ""
    if out.wrong is None and -1 < line.lower().find("repo id") < line.find("no such local directory"):
        out.wrong = "the Hub's repo-id message comes first"
    return out


# ---- data


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def qa_run(rows: list, *flags: str) -> Callable[[Path, Path], Outcome]:
    def run(tmp: Path, root: Path) -> Outcome:
        data = jsonl(tmp / "data.jsonl", rows)
        return lmpipe(["finetune-qa", "--model_name_or_path", root / "base", "--train_file", data,
                       "--output_dir", tmp / "run", *FINETUNE, *flags], tmp)

    return run


def refused(runner: Callable[[Path, Path], Outcome], *texts: str) -> Callable[[Path, Path], Outcome]:
    return lambda tmp, root: expect(runner(tmp, root), 2, *texts)


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


QA_ROWS = [{"question": f"what is {i}?", "answer": f"{i}"} for i in range(10)]
CHATS = [chat(("user", f"hi {i}"), ("assistant", "hello")) for i in range(10)]


def show_data_of_mixture_with_file(tmp: Path, root: Path) -> Outcome:
    """show-data of chat_mixture.yaml with --train_file X: shows X (the flag replaces the recipe's source) or is
    refused naming --train_file; never the recipe's own datasets in silence."""
    data = jsonl(tmp / "mine.jsonl", CHATS)
    out = lmpipe(["show-data", REPO / "recipes" / "finetune" / "chat_mixture.yaml", "--model_name_or_path",
                  root / "base", "--train_file", data, "--rows", "1"], REPO)
    if out.rc == 0:
        out.wrong = None if f"| {data} |" in out.stdout else "showed another source than --train_file"
        return out
    return expect(out, 2, "--train_file")


def counted_per_split(tmp: Path, root: Path) -> Outcome:
    rows = [{"question": f"what is {i}?", "answer": f"{i}"} for i in range(80)]
    out = expect(qa_run(rows)(tmp, root), 0)
    if out.wrong is None and not ("train: 72 kept" in out.stdout and "validation: 8 kept" in out.stdout):
        out.wrong = "counts not per split: " + (line_with(out.stdout, "kept") or "no counts line")
    return out


def label_float(tmp: Path, root: Path) -> Outcome:
    rows = [{"context": f"c {i}", "choices": ["x", "y"], "label": 1} for i in range(5)]
    data = jsonl(tmp / "mc.jsonl", [*rows, {"context": "c", "choices": ["x", "y"], "label": 1.0}])
    return expect(lmpipe(["evaluate", root / "base", "--task", "multiple_choice", "--data", data], tmp), 2, "row 6")


def text_of_mixed_types(tmp: Path, root: Path) -> Outcome:
    data = jsonl(tmp / "mixed.jsonl", [{"text": "some words here " * 20}] * 30 + [{"text": 12345}])
    return expect(lmpipe(["pretrain", "--train_file", data, "--output_dir", tmp / "run", *TINY, "--max_steps", "1"],
                         tmp), 2, "row 31")


CASES = [
    *(Case(f"{sig.name} to launch, {n} process{'es' if n > 1 else ''}", "W1",
           f"exit {128 + sig}, 'stopped by {sig.name}', a complete checkpoint" + (" (or saved, continues)"
                                                                                   if sig == signal.SIGUSR1 else ""),
           signalled(n, sig), n)
      for sig in (signal.SIGHUP, signal.SIGUSR1) for n in (1, 2)),
    Case("resume with --learning_rate 1e-4", "W2", "exit 0, every logged rate after the resume <= 1e-4",
         learning_rate_changed),
    Case("data file replaced, resumed", "W3", "exit 2, a line naming corpus.txt", data_replaced),
    Case("resume with --gradient_accumulation_steps 2", "W4", "exit 2, a line naming the key",
         resumed_with("--gradient_accumulation_steps", "2", key="gradient_accumulation_steps")),
    Case("resume with --per_device_train_batch_size 2", "W4", "exit 2, a line naming the key",
         resumed_with("--per_device_train_batch_size", "2", key="per_device_train_batch_size")),
    Case("1-process run resumed on 2 processes", "W4", "non-zero exit, a line naming the processes",
         resumed_on_two_processes, 2),
    Case("checkpoint with a 3e38 weight, resumed", "W5", "falls back to checkpoint-2, or a line naming it",
         absurd_weight),
    Case("finished run, final model.safetensors truncated", "W6", "repaired, or refused naming model.safetensors",
         truncated_final_model),
    Case("push of that run", "W6", "exit 2 before any upload, naming model.safetensors", truncated_final_model_pushed),
    Case("empty assistant turn", "W7", "exit 2, 'row 11: turn 2 (assistant) content is empty'",
         refused(qa_run([*CHATS, chat(("user", "hi"), ("assistant", ""))], "--messages_column", "messages"),
                 "row 11", "content is empty")),
    Case('"question": ""', "W7", "exit 2, a line naming row 11 and the empty question",
         refused(qa_run([*QA_ROWS, {"question": "", "answer": "x"}]), "row 11", "empty")),
    Case("empty answer", "W7", "exit 2, a line naming row 11 and the empty answer",
         refused(qa_run([*QA_ROWS, {"question": "q?", "answer": " "}]), "row 11", "empty")),
    Case("show-data chat_mixture.yaml --train_file X", "Also", "shows X, or exit 2 naming --train_file",
         show_data_of_mixture_with_file),
    Case("QA key given to a conversation recipe", "Also", "exit 2, a line naming --question_column",
         refused(lambda tmp, root: lmpipe(["finetune-qa", REPO / "recipes" / "finetune" / "chat_mixture.yaml",
                                           "--model_name_or_path", root / "base", "--output_dir", tmp / "run",
                                           *FINETUNE, "--question_column", "q"], REPO), "--question_column")),
    Case("rank 1 of 2 SIGKILLed", "noisy", "non-zero exit, no hang, a line naming rank 1", rank_killed, 2),
    Case("SIGTERM during the final evaluation", "noisy", "exit 143 with a line, the rerun evaluates",
         final_evaluation_stopped),
    Case("launch --num_processes 2 without a config", "noisy", "2 processes train, or a line naming num_processes",
         launch_two_without_config),
    Case("checkpoint with trainer_state.json missing keys", "noisy", "exit 0 from checkpoint-2, a line naming "
         "checkpoint-4", broken_checkpoint("state")),
    Case("checkpoint whose weights do not fit config.json", "noisy", "exit 0 from checkpoint-2, a line naming "
         "checkpoint-4", broken_checkpoint("config")),
    Case(".lmpipe.lock is a directory", "noisy", "exit 2, a line naming .lmpipe.lock", lock_is_a_directory),
    Case('"text": 12345 in one row', "noisy", "exit 2, a line naming row 31", text_of_mixed_types),
    Case("answers mixing text and lists", "noisy", "exit 2, a line naming row 11 (the first list)",
         refused(qa_run([*QA_ROWS, {"question": "q?", "answer": ["a", "b"]}]), "row 11")),
    Case("content parts in one row", "noisy", "exit 2, a line naming row 11",
         refused(qa_run([*CHATS, chat(("user", [{"type": "text", "text": "hi"}]), ("assistant", "yo"))],
                        "--messages_column", "messages"), "row 11")),
    Case("label: 1.0 in one row", "noisy", "exit 2, a line naming row 6", label_float),
    Case("counts of a held-out split", "noisy", "exit 0, 'train: 72 kept' and 'validation: 8 kept'",
         counted_per_split),
    Case("evaluate a missing model directory", "noisy", "exit 2, 'no such local directory' before any Hub message",
         evaluate_missing_directory),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="Comma-separated issue labels (W1, ..., Also, noisy) or names.")
    parser.add_argument("--processes", type=int, default=2, help="1: skip the 2-process cases.")
    parser.add_argument("--keep", default=None, help="Run in this directory and keep it (default: a temp dir).")
    args = parser.parse_args()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    cases = [c for c in CASES if c.processes <= args.processes
             and (not wanted or c.issue in wanted or any(w in c.name for w in wanted))]
    load_start, started = load_average(), time.monotonic()
    root = Path(args.keep or tempfile.mkdtemp(prefix="fault_battery_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        train_base(root)
        for number, case in enumerate(cases, start=1):
            tmp = root / f"case{number:02d}"
            tmp.mkdir()
            began = time.monotonic()
            out = case.run(tmp, root)
            (tmp / "case.stdout").write_text(out.stdout), (tmp / "case.stderr").write_text(out.stderr)
            lines = error_lines(out.stderr)
            case.result = {
                "case": case.name, "issue": case.issue, "processes": case.processes, "expected": case.expected,
                "class": classify(out), "exit": out.rc, "why": out.wrong,
                "line": next((line for line in reversed(lines) if line.startswith("error:")), (lines or [""])[-1]),
                "error_lines": len(lines), "traceback": "Traceback" in out.stderr,
                "seconds": round(time.monotonic() - began, 1),
            }
            print(f"[{number}/{len(cases)}] {case.result['class']:5} {case.issue:5} {case.name}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results = [c.result for c in cases]
    counts = {label: sum(r["class"] == label for r in results) for label in ("CLEAN", "NOISY", "WRONG")}
    print_table(["class", "issue", "case", "exit", "line (last error line) / why wrong"],
                [[r["class"], r["issue"], r["case"], str(r["exit"]),
                  (r["why"] + " | " if r["why"] else "") + r["line"][:110]] for r in results])
    print(f"\nCLEAN {counts['CLEAN']}  NOISY {counts['NOISY']}  WRONG {counts['WRONG']}  "
          f"({len(results)} cases, {time.monotonic() - started:.0f} s)")
    emit_json({"benchmark": "fault_battery", "counts": counts, "cases": results, "machine": machine(),
               "load_average": {"start": load_start, "end": load_average()}})


if __name__ == "__main__":
    main()
