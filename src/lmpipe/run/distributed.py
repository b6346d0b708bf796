"""Multi-process runs: refuse launches that would train independent copies, give every rank rank 0's result,
turn a rank cut off from another into one line, and leave the process group when a command is done."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import TrainingArguments

from lmpipe.errors import LmpipeError
from lmpipe.run.launch import LAUNCHER_NAMES_THE_LOST_RANK, LOST_RANK_EXIT_CODE

Result = TypeVar("Result")
logger = logging.getLogger(__name__)


def check_launch(training: TrainingArguments) -> None:
    """The launcher's process count must be the Trainer's world size, and FSDP needs an accelerator.

    Without a GPU and without `use_cpu`, the Trainer ignores the process group that `accelerate launch` or
    torchrun set up: every process trains and saves its own copy of the model, and nothing says so. FSDP on CPU
    would fail only once the data is prepared, inside Accelerate's FSDP plugin.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and training.device.type == "cpu":
        raise LmpipeError(
            "the accelerate config asks for FSDP, which needs GPUs (Accelerate's FSDP plugin has no CPU path); "
            "on CPU use recipes/accelerate/cpu_2proc.yaml (DDP) with --use_cpu true"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training.world_size != launched:
        raise LmpipeError(
            f"{launched} processes were launched but the Trainer sees {training.world_size} (no GPU, use_cpu false), "
            f"so each would train its own copy: pass --use_cpu true for {launched}-rank DDP on CPU (gloo)"
        )


def restore_cpu_threads(training: TrainingArguments) -> None:
    """Give a single CPU process every core that `accelerate launch` took away.

    Without a GPU, `--cpu` or `--num_cpu_threads_per_process`, `accelerate launch` sets OMP_NUM_THREADS=1: the
    README's one-process CPU run would use one core of many (docs/scaling.md has the cost). The launcher's
    default and a user's own OMP_NUM_THREADS=1 look the same; `python pipelines/...` is never changed.
    """
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if not launched_by_accelerate or training.world_size > 1 or torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0))
    if os.environ.get("OMP_NUM_THREADS") == "1" and torch.get_num_threads() == 1 and cores > 1:
        torch.set_num_threads(cores)
        logger.warning(
            "accelerate launch set OMP_NUM_THREADS=1 (its default without a GPU) for this single CPU process; "
            "using all %d cores (`python pipelines/...` keeps OMP_NUM_THREADS as given)", cores
        )


def leave_process_group() -> None:
    """Destroy the process group once a command has returned on this rank, as torch asks of every program.

    A rank that exits with the group alive can abort while the interpreter shuts down (gloo's worker threads still
    hold work: SIGABRT, "terminate called without an active exception", after a run that finished). Not done after
    an error: a peer may still be inside a collective, and destroying the group under it could hang.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


def on_main_process(training: TrainingArguments, compute: Callable[..., Result], *args) -> Result:
    """`compute(*args)` on the global main process only; every rank gets that one result, or its LmpipeError.

    Used where ranks must agree exactly (a tokenizer trained on the corpus): the others never compute it, and a
    broadcast rather than a shared file also works across nodes that share no disk.
    """
    if training.world_size == 1:
        return compute(*args)
    payload = [None]
    if training.process_index == 0:
        try:
            payload = [compute(*args)]
        except LmpipeError as error:  # sent on, so every rank stops with the same line instead of waiting
            payload = [error]
    broadcast_object_list(payload, from_process=0)
    if isinstance(payload[0], LmpipeError):
        raise payload[0]
    return payload[0]


class RankLost(LmpipeError):
    """This rank lost its connection to another (which died, or the network failed); its message is empty when
    `lmpipe launch` names the rank that died (LAUNCHER_NAMES_THE_LOST_RANK), so the line is printed once."""

    exit_code = LOST_RANK_EXIT_CODE


def lost_connection(error: BaseException) -> str | None:
    """The transport's reason when `error` says a collective lost its peer, else None. NCCL and the stores raise
    torch's DistError; gloo raises a plain RuntimeError from its transport (`.../gloo/transport/tcp/pair.cc:537]
    Read error [127.0.0.1]:43747: Connection reset by peer. This is typically caused by ...`)."""
    text = str(error).strip()
    if not (isinstance(error, torch.distributed.DistError) or "gloo/transport" in text):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split("] ", 1)[-1].split(". ", 1)[0]


@contextlib.contextmanager
def a_lost_rank_is_one_line(training: TrainingArguments) -> Iterator[None]:
    """A rank whose peer died (SIGKILL, out of memory, a lost node) fails inside whatever collective it was in,
    with a long traceback from the transport; instead it stops with one line, or none under `lmpipe launch`."""
    try:
        yield
    except RuntimeError as error:
        reason = lost_connection(error) if training.world_size > 1 else None
        if reason is None:
            raise
        if os.environ.get(LAUNCHER_NAMES_THE_LOST_RANK) == "1":
            raise RankLost("") from None
        raise RankLost(
            f"rank {training.process_index} of {training.world_size} lost its connection to another rank ({reason}),"
            " which died or was stopped: its launcher's log names it; rerun the same command to resume from the"
            " newest complete checkpoint"
        ) from None
