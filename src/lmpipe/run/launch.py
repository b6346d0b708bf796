"""`lmpipe launch`: `accelerate launch` with its options and config files, but signals reach the training
processes and their exit codes come back.

Accelerate 1.x does not do this itself. Its one-process launcher neither forwards signals nor waits on a signal
(SIGTERM kills the launcher and leaves the trainer running; Ctrl-C returns the shell while the trainer still saves)
and turns every non-zero exit into a `CalledProcessError` traceback and exit code 1. Its several-process launcher
(torchrun's elastic agent) does forward SIGTERM/SIGINT and waits, but 30 s before it SIGKILLs the workers, and it
ends in a `SignalException` or `ChildFailedError` traceback and exit code 1.

Here the same preparation functions of Accelerate build the command and environment; then one process is started
in its own session and sent each signal once, and several go through torchrun's agent (given
`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, default here 600 s, to save, and told to forward every signal in
FORWARDED_SIGNALS), whose exceptions are turned back into the exit code of the rank that failed first, or 128 + the
signal. A rank killed by a signal is named in one line; the ranks that only lost their connection to it leave that
line to the launcher. The launcher returns only once every process it started is gone.

`--num_processes N` above 1 starts N processes (torchrun's), with or without a config file: Accelerate alone
would start one on a machine with fewer than two GPUs, and say nothing. More processes than a machine's GPUs
are refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Collection
from typing import Any

from lmpipe.config.recipe import HelpRequested
from lmpipe.errors import LmpipeError

# lmpipe.run.signals.STOP_SIGNALS, each of which the trainers answer by saving (not imported: it loads torch)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)
SHUTDOWN_TIMEOUT_S = "600"  # how long a signalled multi-process run may take to save before torchrun SIGKILLs it
PR_SET_PDEATHSIG = 1
# A rank that lost its connection to another exits with this code, and says nothing when the launcher is lmpipe's
# (which sets LAUNCHER_NAMES_THE_LOST_RANK): the launcher names the rank that died, once, instead of every survivor.
LOST_RANK_EXIT_CODE = 4
LAUNCHER_NAMES_THE_LOST_RANK = "LMPIPE_LAUNCHER_NAMES_THE_LOST_RANK"
QUIET_TORCHRUN_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


def exit_code(returncode: int) -> int:
    """A shell's exit code for a child's return code: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def launch_command(argv: list[str], commands: Collection[str] = ()) -> int:
    """Parse `accelerate launch` options, start the training processes, forward signals, return their exit code.

    The script may be one of `commands` (lmpipe's command names): each process then runs `python -m lmpipe COMMAND`,
    so an installed package launches without a clone of the repository's pipelines/. A command's name is always the
    command; a script of the same name is given as a path (`./pretrain`).
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    if not argv:
        raise LmpipeError("usage: lmpipe launch [accelerate launch options] COMMAND|SCRIPT [arguments ...]")
    if argv[0] in ("-h", "--help"):  # after the script, --help is the script's
        raise HelpRequested("accelerate launch options:\n" + launch_command_parser().format_help())
    parsed = launch_command_parser().parse_args(argv)
    if parsed.training_script in commands:
        if parsed.no_python:
            raise LmpipeError(f"--no_python runs a program, not the lmpipe command {parsed.training_script}")
        parsed.training_script_args = [parsed.training_script, *parsed.training_script_args]
        parsed.training_script, parsed.module = "lmpipe", True
    quiet_defaults(parsed)
    args, defaults, _ = _validate_launch_command(parsed)
    sagemaker = defaults is not None and defaults.compute_environment == "AMAZON_SAGEMAKER"
    if not args.cpu and (args.use_deepspeed or args.tpu or sagemaker):
        raise LmpipeError("lmpipe launch runs one or several local processes (DDP, FSDP); use accelerate launch for "
                          "DeepSpeed, TPU or SageMaker")
    several_local = (args.num_processes or 1) > 1 and not args.mpirun_hostfile  # not Accelerate's MULTI_CPU + mpirun
    if several_local or (not args.cpu and (args.multi_gpu or args.use_fsdp or args.use_megatron_lm)):
        check_one_process_per_gpu(args)
        return launch_several(args)
    return launch_one(args)


def quiet_defaults(parsed) -> None:
    """Without a config file, Accelerate fills one machine, no mixed precision (the recipe's `bf16` / `fp16` set the
    Trainer's) and no dynamo, and prints five lines saying so on every launch: give it those values instead. A
    config file's values, or the options given, are left as they are."""
    from accelerate.commands.config import default_config_file

    if parsed.config_file is not None or os.path.isfile(default_config_file):
        return
    for option, value in (("num_machines", 1), ("mixed_precision", "no"), ("dynamo_backend", "no")):
        if getattr(parsed, option) is None:
            setattr(parsed, option, value)


def check_one_process_per_gpu(args) -> None:
    """Each process trains on the GPU of its local rank: more processes on a machine than it has GPUs would fail
    in the extra ranks (an invalid device ordinal) once they had loaded everything. Without a GPU, or with
    `--cpu`, the processes are CPU processes."""
    import torch

    gpus = torch.cuda.device_count() if not args.cpu else 0
    per_machine = (args.num_processes or 1) // (args.num_machines or 1)
    if 0 < gpus < per_machine:
        raise LmpipeError(
            f"--num_processes {args.num_processes}: this machine has {gpus} GPU(s), one for each process; launch"
            f" at most {gpus} a machine, or CPU processes with --cpu (and --use_cpu true for the run)"
        )


def launch_one(args) -> int:
    """One process in its own session, so a terminal's Ctrl-C reaches it only through us, once."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    command, environment = prepare_simple_launcher_cmd_env(args)
    child = subprocess.Popen(command, env=environment, start_new_session=True)

    def forward(signal_number, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal_number)  # the trainer only: it stops its own data-loader workers

    previous = {number: signal.signal(number, forward) for number in FORWARDED_SIGNALS}
    try:
        return exit_code(child.wait())
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def launch_several(args) -> int:
    """torchrun's agent in this process: it forwards signals to every worker and waits; we keep their codes."""
    import torch.distributed.run as torchrun
    from accelerate.utils import patch_environment
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    environment = prepare_multi_gpu_env(args)
    environment.setdefault(
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    )
    environment[LAUNCHER_NAMES_THE_LOST_RANK] = "1"
    torchrun_args = _filter_args(
        args,
        torchrun.get_args_parser(),
        ["--training_script", args.training_script, "--training_script_args", args.training_script_args],
    )
    # torchrun's agent forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT unless told otherwise; SIGUSR1 would kill it
    torchrun_args.signals_to_handle = ",".join([number.name for number in FORWARDED_SIGNALS] + ["SIGQUIT"])
    # torchrun's lines on a signal and on a worker's failure: ours says it in one (each of its loggers has a level)
    quiet = {name: logging.getLogger(name) for name in QUIET_TORCHRUN_LOGGERS}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.CRITICAL)
    try:
        with patch_environment(**environment):
            torchrun.run(torchrun_args)
        return 0
    except ChildFailedError as failed:
        rank, failure = first_cause(failed.failures)
        say_why_the_ranks_stopped(rank, failure)
        return exit_code(failure.exitcode)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    finally:
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
        wait_for_children()


def first_cause(failures: dict) -> tuple[int, Any]:
    """The failed rank that stopped the others. torchrun records failures to the second, those it found first,
    then those of the ranks it stopped itself (SIGTERM, then SIGKILL after the shutdown timeout); within a second,
    a rank killed by a signal comes first, then one that failed on its own, then one that only lost its connection
    to another, then one stopped by SIGTERM (the agent's: a trainer saves on a SIGTERM and exits)."""

    def order(item):
        rank, failure = item
        code = failure.exitcode
        cause = 3 if code == -signal.SIGTERM else 0 if code < 0 else 2 if code == LOST_RANK_EXIT_CODE else 1
        return failure.timestamp, cause, rank

    return min(failures.items(), key=order)


def say_why_the_ranks_stopped(rank: int, failure) -> None:
    """One line for a rank killed by a signal or cut off from another: the ranks themselves said nothing (a rank
    that failed on its own has printed its own line)."""
    rerun = "rerun the same command to resume from the newest complete checkpoint"
    if failure.exitcode < 0:
        name = failure.signal_name()
        why = " (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
        line = f"rank {rank} (PID {failure.pid}) was killed by {name}{why}; the other ranks stopped: {rerun}"
    elif failure.exitcode == LOST_RANK_EXIT_CODE:
        line = f"rank {rank} (PID {failure.pid}) lost its connection to a rank of another node, or the network; {rerun}"
    else:
        return
    print(f"error: {line}", file=sys.stderr)


def wait_for_children() -> None:
    """Reap every child still running (a second signal can cut torchrun's own wait short)."""
    for number in FORWARDED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)  # the workers already have their signal; now only wait
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def stop_with_launcher() -> None:
    """Under a launcher, have the kernel send this process SIGTERM when the launcher dies (Linux only).

    A plain `accelerate launch` killed by SIGTERM would otherwise leave its trainer training to the end; with
    this it saves a checkpoint and stops, as on a SIGTERM of its own.
    """
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
