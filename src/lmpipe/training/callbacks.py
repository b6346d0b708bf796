"""Trainer callbacks that let a run die and come back: stop on a non-finite loss or weight, never step past
`max_steps` on a resume, log at every checkpoint so a resumed run reports the same train loss as an
uninterrupted one, seal every checkpoint with its manifest, and keep a finished run's metrics until a new attempt
has started. Saving on a signal is `run.signals`; all of them are wired in by `reliability_callbacks`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmpipe.errors import LmpipeError
from lmpipe.model.finite import live_non_finite
from lmpipe.run.checkpoints import newest_complete_checkpoint
from lmpipe.run.files import METRICS_NAME
from lmpipe.run.manifest import MANIFEST_NAME, write_manifest
from lmpipe.run.signals import SaveOnSignal, StepVote, on_any_rank

# A divergence this many steps or fewer after resuming from a checkpoint blames that checkpoint (and every later
# one): its weights or optimizer state led straight to it, so it is not named as the checkpoint to go back to.
SUSPECT_STEPS_AFTER_RESUME = 10


class StopOnNonFinite(TrainerCallback):
    """A NaN or infinite training loss, weight or optimizer state stops the run before anything is saved.

    The Trainer's `logging_nan_inf_filter` hides such a loss and trains on, and a diverging update can leave
    non-finite weights after a finite loss (the loss comes before the update). We watch the loss the model returns
    (a forward hook: callbacks are not given the loss) without a device sync, check it once per optimizer step,
    and check every weight and optimizer tensor whenever a checkpoint or the final model is about to be saved, so
    that no saved checkpoint is poisoned. The stop message names the newest checkpoint that is really finite and
    that did not itself lead to the divergence: one resumed from `SUSPECT_STEPS_AFTER_RESUME` steps or fewer
    before it (a finite but absurd weight passes every check on disk) is skipped, with why.
    """

    def __init__(self, vote: StepVote):
        self.vote = vote
        self.problem: str | None = None
        self.hook = None
        self.resumed_step = 0

    def _watch(self, module, inputs, output):
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if module.training and loss is not None:
            finite = torch.isfinite(loss.detach()).all()
            self.vote.loss_finite = finite if self.vote.loss_finite is None else self.vote.loss_finite & finite

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.problem, self.vote.loss_finite = None, None
        self.resumed_step = state.global_step  # 0 unless resumed: the Trainer has loaded the checkpoint's state
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
            raise LmpipeError(f"{self.problem}; stopped without saving it. {self._advice(args, state.global_step)}")

    def _advice(self, args, step: int) -> str:
        after = step - self.resumed_step
        if not self.resumed_step or after > SUSPECT_STEPS_AFTER_RESUME:
            good = newest_complete_checkpoint(args.output_dir, args.save_only_model)
            return (
                f"Last good checkpoint: {good}. Lower learning_rate or check the data, then rerun to resume from it"
                if good else
                "No finite checkpoint to resume from: lower learning_rate or check the data, then rerun to start over"
            )
        resumed = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.resumed_step}"
        why = f"not {resumed}: the run diverged {after} step(s) after resuming from it, so it is suspect"
        good = newest_complete_checkpoint(args.output_dir, args.save_only_model, before_step=self.resumed_step)
        if good:
            return (
                f"Last good checkpoint: {good} ({why}). Lower learning_rate or check the data, then rerun with"
                f" --resume_from_checkpoint {good}"
            )
        return (
            f"No earlier checkpoint to resume from ({why}): lower learning_rate or check the data, then remove"
            f" {args.output_dir}'s checkpoints and rerun to start over"
        )


def logged_loss_at(state: TrainerState) -> float | None:
    """The training loss logged at the current step (`LogAtCheckpoints` logs one at every save), else None."""
    rows = [row for row in state.log_history if "loss" in row and row.get("step") == state.global_step]
    return rows[-1]["loss"] if rows else None


class SealCheckpoint(TrainerCallback):
    """Write each checkpoint's manifest (`run.manifest`) once every rank has written its files, last of all.

    The Trainer calls `on_save` after the whole checkpoint is on disk on this rank; other ranks write their RNG
    state without a barrier, hence the wait."""

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            names = [p.relative_to(checkpoint).as_posix() for p in sorted(checkpoint.rglob("*")) if p.is_file()]
            names = [name for name in names if not name.startswith(MANIFEST_NAME)]  # itself, or a torn .tmp of it
            write_manifest(checkpoint, names, state.global_step, logged_loss_at(state))


class NotFinishedOnceStarted(TrainerCallback):
    """`metrics.json` marks a finished run: remove it only once this attempt has loaded its checkpoint (weights,
    optimizer and trainer state) and is about to train, so a checkpoint that fails to load leaves it in place."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / METRICS_NAME).unlink(missing_ok=True)


class RecordRunOnceLoaded(TrainerCallback):
    """`identity.json` and `recipe.yaml` say whose run `output_dir` holds: `record` writes them (rank 0) only once
    this attempt has loaded its checkpoint, so a resume that fails to load leaves the run's record as it was. It
    goes first (`first_callback`): a resume at the last step stops in `on_train_begin` and is still this session."""

    def __init__(self, record: Callable[[], None]):
        self.record = record

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.record()


def first_callback(trainer, callback: TrainerCallback) -> None:
    """Add `callback` before every other one (`add_callback` appends)."""
    trainer.callback_handler.callbacks.insert(0, callback)


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
    """In this order: nothing to train stops first (a finished run's metrics stay), then they go; a signal asks to
    save, the save is logged, a non-finite loss vetoes both; a save is sealed by its manifest."""
    vote = StepVote()
    return [
        NoStepPastMaxSteps(), NotFinishedOnceStarted(), SaveOnSignal(vote), LogAtCheckpoints(), StopOnNonFinite(vote),
        SealCheckpoint(),
    ]
