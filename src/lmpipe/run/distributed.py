"""Multi-process runs: refuse launches that would train independent copies, and give every rank rank 0's result."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate.utils import broadcast_object_list
from transformers import TrainingArguments

from lmpipe.errors import LmpipeError

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
