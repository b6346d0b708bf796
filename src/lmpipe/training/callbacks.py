"""Trainer callbacks that let a run die and come back: stop on a non-finite loss or weight, never step past
`max_steps` on a resume, and log at every checkpoint so a resumed run reports the same train loss as an
uninterrupted one. Saving on a signal is `run.signals`; all of them are wired in by `reliability_callbacks`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import TrainerCallback, TrainerControl

from lmpipe.errors import LmpipeError
from lmpipe.model.finite import live_non_finite
from lmpipe.run.checkpoints import newest_complete_checkpoint
from lmpipe.run.signals import SaveOnSignal, StepVote, on_any_rank


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


def reliability_callbacks() -> list[TrainerCallback]:
    """In this order: nothing to train stops first, a signal asks to save, the save is logged, a non-finite loss
    vetoes both."""
    vote = StepVote()
    return [NoStepPastMaxSteps(), SaveOnSignal(vote), LogAtCheckpoints(), StopOnNonFinite(vote)]
