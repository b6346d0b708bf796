"""Saving on a signal: SIGTERM (a scheduler's preemption, `kill`) or Ctrl-C finishes the current optimizer step,
saves a checkpoint on every rank and exits with 128 + the signal's number, as the signal would have.

The Trainer has no signal handling. Ranks agree on the step to stop at through one small all-reduce per step
(`StepVote`), shared with the non-finite-loss check so a step costs one collective for both.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from lmpipe.errors import LmpipeError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A Ctrl-C reaches every process of the terminal's group, and SLURM signals every process of a job step, while the
# launcher forwards the same signal: signals this close together are one request to stop, not "stop now".
SAME_STOP_WITHIN_S = 2.0


def on_any_rank(flags: list[int], args: TrainingArguments) -> list[int]:
    """The largest of each flag over all ranks, so that every rank stops at the same step (one tiny all-reduce)."""
    if args.world_size > 1 and torch.distributed.is_initialized():
        tensor = torch.tensor(flags, device=args.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [int(flag) for flag in tensor.tolist()]
    return list(flags)


class StepVote:
    """What every rank must agree on after each optimizer step: a stop signal and a non-finite training loss on
    any rank. SaveOnSignal and StopOnNonFinite share one vote, so a step costs one all-reduce for both, whichever
    of them asks first."""

    def __init__(self):
        self.signal_number = 0  # this rank's, set by the signal handler
        self.loss_finite: torch.Tensor | None = None  # this rank's, accumulated by the loss hook without a sync
        self.step = -1
        self.agreed = (0, False)

    def agree(self, args: TrainingArguments, step: int) -> tuple[int, bool]:
        """(signal number, loss not finite) over all ranks at `step`; reduced once per step."""
        if step != self.step:
            bad_loss = int(self.loss_finite is not None and not bool(self.loss_finite))
            signal_number, bad_loss = on_any_rank([self.signal_number, bad_loss], args)
            self.step, self.agreed, self.loss_finite = step, (signal_number, bool(bad_loss)), None
        return self.agreed


class TrainingInterrupted(LmpipeError):
    """Raised once the checkpoint is saved; the command exits with 128 + the signal's number, as the signal would."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class SaveOnSignal(TrainerCallback):
    """SIGTERM (preemption, `kill`) or Ctrl-C: finish the current optimizer step, save a checkpoint, exit.

    The Trainer has no signal handling; a second signal (more than SAME_STOP_WITHIN_S after the first) stops at
    once without saving. Ranks agree on the step to stop at, so every rank saves the same checkpoint.
    """

    def __init__(self, vote: StepVote):
        self.vote = vote
        self.signal_number = 0
        self.signalled_at = 0.0
        self.previous_handlers: dict[int, Any] = {}

    def _handle(self, signal_number, frame):
        if self.signal_number:
            if time.monotonic() - self.signalled_at < SAME_STOP_WITHIN_S:
                return  # the same stop delivered twice: by a terminal or scheduler and by the launcher forwarding it
            self.restore_handlers()  # a later second signal: the user insists
            signal.raise_signal(signal_number)
            return
        self.signal_number, self.signalled_at = signal_number, time.monotonic()
        self.vote.signal_number = signal_number
        print(
            f"\n{signal.Signals(signal_number).name}: saving a checkpoint after this step (send it again to stop now)",
            file=sys.stderr,
        )

    def restore_handlers(self):
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)
        self.previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal_number = self.vote.signal_number = 0
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self.previous_handlers = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        self.signal_number = self.vote.agree(args, state.global_step)[0]
        if self.signal_number:
            control.should_save = True  # after this step's due evaluation, if any: it draws from the RNG we save
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.signal_number:  # the loop broke off mid-epoch: no end-of-epoch evaluation
            control.should_evaluate = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()
        if self.signal_number:
            if args.world_size > 1 and torch.distributed.is_initialized():
                # The first rank to exit makes torchrun stop the others: none leaves before all have saved, so
                # every rank gets to say where it saved.
                torch.distributed.barrier()
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(self.signal_number).name} after step {state.global_step}: saved"
                f" {args.output_dir}/checkpoint-{state.global_step}; rerun the same command to resume from it",
                self.signal_number,
            )


def restore_signal_handlers(callbacks: list[TrainerCallback]) -> None:
    """Put back the handlers SaveOnSignal replaced when training ended in an exception (no on_train_end then):
    otherwise a later Ctrl-C in the same process would only set a flag on a finished run."""
    for callback in callbacks:
        if isinstance(callback, SaveOnSignal):
            callback.restore_handlers()
