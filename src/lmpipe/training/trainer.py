"""The Trainer lmpipe runs: exact token-weighted evaluation, model FLOP/s in the logs, the reliability callbacks.

`build_trainer` makes it for every command; `training.loop` trains it.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from lmpipe.loss.train_loss import TokenWeightedTrainLoss
from lmpipe.training.callbacks import reliability_callbacks
from lmpipe.training.exact_eval import NllStatistics, compute_exact_metrics
from lmpipe.training.flops import ModelFlopsMeter, device_peak_flops, flops_per_token
from lmpipe.training.host_memory import keep_freed_host_memory
from lmpipe.training.optimizers import muon_with_adamw, schedule_kwargs
from lmpipe.training.resume_settings import RecipeSettingsOnResume
from lmpipe.training.zero_shot_tasks import ZeroShotTask, prepare_zero_shot_tasks, score_zero_shot_tasks


class RecipeOptimization:
    """The recipe's optimizer and schedule for a Trainer (lmpipe's, or TRL's DPOTrainer): `optimizer: muon` (Muon
    on the blocks' matrices, AdamW on the rest: `training.optimizers`), warmup_stable_decay's keys as the Trainer's
    own `lr_scheduler_kwargs`, and the hyperparameters the recipe gives put back over a resumed checkpoint's
    (`training.resume_settings`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe_settings = RecipeSettingsOnResume()
        self.add_callback(self.recipe_settings)

    def create_optimizer(self, model=None):
        if self.optimizer is None and getattr(self.args, "optimizer", "adamw") == "muon":
            model = self.model if model is None else model
            self.optimizer = muon_with_adamw(model, self.args, self.get_decay_parameter_names(model))
        optimizer = super().create_optimizer(model)
        self.recipe_settings.keep(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        extra = schedule_kwargs(self.args, num_training_steps)
        if not extra:
            return super().create_scheduler(num_training_steps, optimizer)
        args, self.args = self.args, copy.copy(self.args)
        self.args.lr_scheduler_kwargs = {**(args.lr_scheduler_kwargs or {}), **extra}
        try:
            return super().create_scheduler(num_training_steps, optimizer)
        finally:
            self.args = args


class ExactEvalTrainer(RecipeOptimization, Trainer):
    """A Trainer whose `eval_loss` is total NLL / total scored tokens over all ranks.

    The stock `eval_loss` is a mean of per-batch means; it is kept, renamed `eval_batch_mean_loss`, for comparison.
    Needs `preprocess_logits_for_metrics=NllStatistics(...)` and `compute_metrics=compute_exact_metrics`.
    `eval_data_collator` (default: the training one) must keep one row per example: `gather_for_metrics` drops
    the samples duplicated across ranks by row, so a padding-free collator (a whole batch in one row) cannot be used.
    Every evaluation also scores the recipe's `zero_shot_tasks` (`eval_zero_shot/NAME/METRIC` in the same log row;
    `eval_runtime` includes them, `eval_zero_shot_runtime` is their share).
    """

    def __init__(
        self,
        *args,
        eval_data_collator=None,
        flops_meter: ModelFlopsMeter | None = None,
        zero_shot: list[ZeroShotTask] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator or self.data_collator
        self.flops_meter = flops_meter
        self.zero_shot = zero_shot or []

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs also carry the model TFLOP/s (and MFU on a known GPU) since the previous one."""
        if self.flops_meter is not None:
            self.flops_meter.add_to_log(logs, self.state.num_input_tokens_seen, self.args.world_size)
        super().log(logs, *args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        training_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        for key in [k for k in output.metrics if k.endswith("_exact_loss")]:
            prefix = key[: -len("_exact_loss")]
            output.metrics[f"{prefix}_batch_mean_loss"] = output.metrics.pop(f"{prefix}_loss", math.nan)
            output.metrics[f"{prefix}_loss"] = output.metrics.pop(key)
        if self.zero_shot and metric_key_prefix == "eval":
            start = time.perf_counter()
            scores = score_zero_shot_tasks(self.accelerator.unwrap_model(self.model), self.zero_shot)
            output.metrics.update({f"eval_{key}": value for key, value in scores.items()})
            output.metrics["eval_zero_shot_runtime"] = round(time.perf_counter() - start, 4)
        return output


class TokenWeightedLossTrainer(TokenWeightedTrainLoss, ExactEvalTrainer):
    """ExactEvalTrainer whose logged train loss weights steps by their learned tokens (QA pairs, conversations)."""


def without_trainer_push(args: TrainingArguments) -> TrainingArguments:
    """The Trainer's copy of the arguments with its own Hub push off: lmpipe.run.hub pushes once the run is finished."""
    if not args.push_to_hub:
        return args
    local = copy.copy(args)
    local.push_to_hub = False
    return local


def build_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    data_collator,
    tokenizer: PreTrainedTokenizerBase,
    byte_lengths: np.ndarray,
    eval_data_collator=None,
    trainer_class: type[ExactEvalTrainer] = ExactEvalTrainer,
    context_length: int | None = None,
) -> ExactEvalTrainer:
    """The Trainer for every lmpipe run: exact evaluation, the recipe's `zero_shot_tasks` and the reliability
    callbacks wired in; with `context_length` (block size / max length) its logs and metrics carry model FLOP/s. On a
    CPU (and `host_memory_reuse`) freed host memory is kept for the next step from here on."""
    if getattr(args, "host_memory_reuse", False) and args.device.type == "cpu":  # plain TrainingArguments: off
        keep_freed_host_memory()
    meter = None
    if context_length is not None:
        peak = device_peak_flops(args.device, args.bf16 or args.fp16)
        meter = ModelFlopsMeter(flops_per_token(model, context_length), peak)
    zero_shot = prepare_zero_shot_tasks(getattr(args, "zero_shot_tasks", None), model, tokenizer)
    trainer = trainer_class(
        eval_data_collator=eval_data_collator,
        flops_meter=meter,
        zero_shot=zero_shot,
        model=model,
        args=without_trainer_push(args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        preprocess_logits_for_metrics=NllStatistics(byte_lengths),
        compute_metrics=compute_exact_metrics,
    )
    for callback in reliability_callbacks():  # after the progress bar's, so it is closed before they raise
        trainer.add_callback(callback)
    return trainer
