"""Trainer callbacks that let a run die and come back: save on SIGTERM/Ctrl-C, stop on a non-finite loss or weight,
and log at every checkpoint so a resumed run reports the same train loss as an uninterrupted one."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainingArguments

from lmpipe.run.checkpoints import newest_complete_checkpoint
from lmpipe.errors import LmpipeError
from lmpipe.model.finite import live_non_finite

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


class StopOnNonFinite(TrainerCallback):
    """A NaN or infinite training loss, weight or optimizer state stops the run before anything is saved.

    The Trainer's `logging_nan_inf_filter` hides such a loss and trains on, and a diverging update can leave
    non-finite weights after a finite loss (the loss comes before the update). We watch the loss the model returns
    (a forward hook: callbacks are not given the loss) without a device sync, check it once per optimizer step,
    and check every weight and optimizer tensor whenever a checkpoint or the final model is about to be saved, so
    that no saved checkpoint is poisoned. The stop message names the newest checkpoint that is really finite.
    """

    def __init__(self, vote: StepVote):
        self.vote = vote
        self.problem: str | None = None
        self.hook = None

    def _watch(self, module, inputs, output):
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if module.training and loss is not None:
            finite = torch.isfinite(loss.detach()).all()
            self.vote.loss_finite = finite if self.vote.loss_finite is None else self.vote.loss_finite & finite

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.problem, self.vote.loss_finite = None, None
        self.hook = model.register_forward_hook(self._watch)

    def _veto(self, control: TrainerControl) -> TrainerControl:
        control.should_save = control.should_evaluate = control.should_log = False
        control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.vote.agree(args, state.global_step)[1]:
            self.problem = f"step {state.global_step}: the training loss is not finite (NaN or inf)"
        elif control.should_save or control.should_training_stop:  # a second all-reduce only when saving
            bad_state = live_non_finite(model, optimizer)
            if on_any_rank([int(bad_state is not None)], args)[0]:
                where = f"the {bad_state}" if bad_state else "another rank's weights or optimizer state"
                self.problem = f"step {state.global_step}: {where} is not finite (NaN or inf) after this step"
        return self._veto(control) if self.problem else control

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._veto(control) if self.problem else control

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()
        if self.problem:
            good = newest_complete_checkpoint(args.output_dir, args.save_only_model)
            resume = (
                f"Last good checkpoint: {good}. Lower learning_rate or check the data, then rerun to resume from it"
                if good else
                "No finite checkpoint to resume from: lower learning_rate or check the data, then rerun to start over"
            )
            raise LmpipeError(f"{self.problem}; stopped without saving it. {resume}")


class TrainingAlreadyDone(Exception):
    """Raised before the first step when the resumed checkpoint already has every step: there is nothing to train."""


class NoStepPastMaxSteps(TrainerCallback):
    """Resumed from a checkpoint at `max_steps` (a run killed after its last save, before it finished), the Trainer
    would take one more step: it compares the step count only after a step. Stop before the first step instead;
    the model then holds the checkpoint's weights, ready for the final evaluation."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingAlreadyDone(state.global_step)


class LogAtCheckpoints(TrainerCallback):
    """Log the train loss at every save and at the last step, so a checkpoint's log history covers every step
    before it and `mean_train_loss` is the same whether the run was resumed or not."""

    def _log_if_saving(self, args, control):
        if args.logging_strategy != "no" and (control.should_save or control.should_training_stop):
            control.should_log = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._log_if_saving(args, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._log_if_saving(args, control)


def restore_signal_handlers(callbacks: list[TrainerCallback]) -> None:
    """Put back the handlers SaveOnSignal replaced when training ended in an exception (no on_train_end then):
    otherwise a later Ctrl-C in the same process would only set a flag on a finished run."""
    for callback in callbacks:
        if isinstance(callback, SaveOnSignal):
            callback.restore_handlers()


def reliability_callbacks() -> list[TrainerCallback]:
    """In this order: nothing to train stops first, a signal asks to save, the save is logged, a non-finite loss
    vetoes both."""
    vote = StepVote()
    return [NoStepPastMaxSteps(), SaveOnSignal(vote), LogAtCheckpoints(), StopOnNonFinite(vote)]


def mean_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean train loss over the whole run, across resumes (None: nothing logged): weighted by each log row's
    `learned_tokens` when every row has them (train_loss.TokenWeightedLossTrainer), else by its steps.

    The Trainer's own `train_loss` averages only the steps of the current `train()` call.
    """
    rows = [row for row in log_history if "loss" in row and "step" in row]
    if not rows:
        return None
    if all("learned_tokens" in row for row in rows):
        tokens = sum(row["learned_tokens"] for row in rows)
        total = sum(row["loss"] * row["learned_tokens"] for row in rows)
        return total / tokens if tokens and math.isfinite(total) else None
    total, previous_step = 0.0, 0
    for row in rows:
        total += row["loss"] * (row["step"] - previous_step)
        previous_step = row["step"]
    return total / previous_step if previous_step and math.isfinite(total) else None
