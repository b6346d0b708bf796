"""The recipe keys that may change between resumes (`run.identity.RESUME_KEYS`), applied for real on a resume.

Resuming, the Trainer loads the checkpoint's optimizer state, whose parameter groups carry the old learning rate,
betas, epsilon and weight decay; the checkpoint's scheduler state, whose `base_lrs` are the old learning rate; and
the checkpoint's `trainer_state.json`, whose logging, evaluation and save intervals it then uses. A changed
`learning_rate` or `logging_steps` would be recorded in `recipe.yaml` and never used. The Trainer has no hook
between loading those states and the first step but `on_train_begin`, which is where this puts the recipe's back.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback


class RecipeSettingsOnResume(TrainerCallback):
    """The recipe's optimizer hyperparameters, schedule base rate and step intervals over the checkpoint's.

    `keep` records each parameter group's hyperparameters as the Trainer built them from the recipe (called from
    `create_optimizer`, before a checkpoint is loaded into them). With a `LambdaLR` schedule (every one of the
    Trainer's but `reduce_lr_on_plateau`), the rate from the resumed step on is the new base rate times the
    schedule for the new length: what an uninterrupted run with the new settings would use at that step.
    """

    def __init__(self):
        self.hyperparameters: list[dict[str, Any]] | None = None

    def keep(self, optimizer) -> None:
        self.hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        state.compute_steps(args, state.max_steps)  # logging / eval / save intervals: the recipe's, not the state's
        if state.global_step == 0 or optimizer is None or self.hyperparameters is None:
            return
        schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # an Accelerate wrapper steps once per process
        scheduled = isinstance(schedule, LambdaLR)  # else the rate is the scheduler's own state, kept as restored
        for group, recipe in zip(optimizer.param_groups, self.hyperparameters):
            group.update({key: value for key, value in recipe.items() if scheduled or key != "lr"})
        if scheduled:
            schedule.base_lrs = [recipe["lr"] for recipe in self.hyperparameters]
            for group, base in zip(optimizer.param_groups, schedule.base_lrs):
                group["initial_lr"] = base
            schedule.last_epoch -= 1
            schedule.step()  # the rate at the resumed step, from the new base, by the scheduler's own formula
