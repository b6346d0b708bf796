"""Saving on a signal: every termination signal a scheduler or a terminal sends (SIGTERM: preemption, `kill`;
SIGINT: Ctrl-C; SIGHUP: the terminal closed; SIGUSR1 / SIGUSR2: SLURM's `--signal`, LSF's and SGE's warnings;
SIGXCPU: a CPU-time limit) finishes the current optimizer step, saves a checkpoint on every rank and exits with
128 + the signal's number, as the signal would have. During the final evaluation a signal stops it instead, and
the rerun evaluates the last checkpoint.

The Trainer has no signal handling. Ranks agree on the step to stop at through one small all-reduce per step
(`StepVote`), shared with the non-finite-loss check so a step costs one collective for both.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from lmpipe.errors import LmpipeError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)
# The kernel repeats SIGXCPU every CPU second past the soft limit until the hard limit's SIGKILL: a repeat of it is
# never the user insisting.
REPEATED_SIGNALS = (signal.SIGXCPU,)
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
    """A STOP_SIGNALS signal: finish the current optimizer step, save a checkpoint, exit; during the final
    evaluation (`stops_the_final_evaluation`), stop it.

    The Trainer has no signal handling; a second signal (more than SAME_STOP_WITHIN_S after the first) stops at
    once without saving. Ranks agree on the step to stop at, so every rank saves the same checkpoint.
    """

    def __init__(self, vote: StepVote):
        self.vote = vote
        self.signal_number = 0
        self.signalled_at = 0.0
        self.previous_handlers: dict[int, Any] = {}
        self.held = False  # by `stops_the_final_evaluation`: the handlers outlive training
        self.trained = False  # training has ended (held only): a signal now stops the final evaluation

    def _handle(self, signal_number, frame):
        if self.signal_number:
            if signal_number in REPEATED_SIGNALS or time.monotonic() - self.signalled_at < SAME_STOP_WITHIN_S:
                return  # the same stop delivered twice: by a terminal or scheduler and by the launcher forwarding it
            self.restore_handlers()  # a later second signal: the user insists
            signal.raise_signal(signal_number)
            return
        self.signal_number, self.signalled_at = signal_number, time.monotonic()
        self.vote.signal_number = signal_number
        then = "stopping the final evaluation" if self.trained else "saving a checkpoint after this step"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone, and stderr with it
            print(f"\n{signal.Signals(signal_number).name}: {then} (send it again to stop now)", file=sys.stderr)

    def listen(self):
        """Install the handlers (Python delivers signals to the main thread only); a no-op while installed."""
        if not self.previous_handlers and threading.current_thread() is threading.main_thread():
            self.signal_number = self.vote.signal_number = 0
            self.previous_handlers = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}

    def restore_handlers(self):
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)
        self.previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.listen()

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
        if not self.held or self.signal_number:
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

    def on_prediction_step(self, args, state, control, **kwargs):
        """In the final evaluation, ranks agree after each batch whether to stop (one tiny all-reduce a batch)."""
        if not self.trained:
            return control
        signal_number = on_any_rank([self.signal_number], args)[0]
        if signal_number:
            raise FinalEvaluationInterrupted(signal_number, f"{args.output_dir}/checkpoint-{state.global_step}")
        return control


class FinalEvaluationInterrupted(Exception):
    """A signal stopped the final evaluation; `stops_the_final_evaluation` makes sure the last step is saved."""

    def __init__(self, signal_number: int, checkpoint: str):
        super().__init__(signal_number, checkpoint)
        self.signal_number, self.checkpoint = signal_number, checkpoint


@contextlib.contextmanager
def stops_the_final_evaluation(
    callbacks: list[TrainerCallback], save_checkpoint: Callable[[], None]
) -> Iterator[Callable[[], None]]:
    """Keep SaveOnSignal's handlers from training through the final evaluation and the final save, then put back
    the ones it replaced (also when training ended in an exception: otherwise a later Ctrl-C in the same process
    would only set a flag on a finished run). Yields the call that says training has ended.

    After it, a signal stops the final evaluation on every rank at the same batch; `save_checkpoint` saves the
    last step when the save strategy did not (so the rerun evaluates it instead of training again), and the run
    exits 128 + the signal's number. A signal during the final save lets the run finish.
    """
    stop = next((callback for callback in callbacks if isinstance(callback, SaveOnSignal)), None)
    if stop is None:
        yield lambda: None
        return

    def training_ended():
        stop.trained = True

    stop.held, stop.trained = True, False
    stop.listen()
    try:
        yield training_ended
    except FinalEvaluationInterrupted as stopped:
        save_checkpoint()
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(stopped.signal_number).name} during the final evaluation: training had"
            f" finished, saved in {stopped.checkpoint}; rerun the same command to evaluate it (no more training)",
            stopped.signal_number,
        ) from None
    finally:
        stop.held = stop.trained = False
        stop.restore_handlers()
