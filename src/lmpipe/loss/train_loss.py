"""Token-weighted train loss for rows of different lengths (QA pairs, conversations).

The Trainer logs the mean of per-step losses; each step's loss is already total NLL / learned tokens of that step
(`num_items_in_batch`), but steps with 40 learned tokens and with 4 count the same. Here every logged `loss` is the
total NLL / total learned tokens since the previous log, and each log row carries `learned_tokens`, so the run's
`train_loss` (`mean_train_loss`) weights every step by its learned tokens, across resumes too.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class TokenWeightedTrainLoss:
    """A `transformers.Trainer` mixin (put it first among the bases) whose logged train loss weights steps by their
    learned (non -100, shifted) label tokens; `training.trainer.TokenWeightedLossTrainer` is the one lmpipe runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._nll_since_log = torch.zeros((), dtype=torch.float64, device=self.args.device)
        self._tokens_since_log = torch.zeros((), dtype=torch.float64, device=self.args.device)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's micro-batches and their learned tokens (summed over ranks when the Trainer
        averages tokens across devices, its default)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items_in_batch is not None:
            self._tokens_since_log += torch.as_tensor(num_items_in_batch, device=self.args.device).double()
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The returned micro-batch loss is its NLL / the step's learned tokens: times those tokens, its NLL."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None:
            self._nll_since_log += loss.double() * torch.as_tensor(num_items_in_batch, device=loss.device).double()
        return loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            nll = self.accelerator.gather(self._nll_since_log.reshape(1))
            tokens = self.accelerator.gather(self._tokens_since_log.reshape(1))
            # averaged across devices: every rank's NLL is scaled by the world size and its count is the global one
            reduce = torch.mean if self.args.average_tokens_across_devices else torch.sum
            nll, tokens = reduce(nll).item(), reduce(tokens).item()
            if tokens > 0:
                logs["loss"] = nll / tokens
                logs["learned_tokens"] = int(round(tokens))
            self._nll_since_log.zero_()
            self._tokens_since_log.zero_()
        super().log(logs, *args, **kwargs)


def mean_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean train loss over the whole run, across resumes (None: nothing logged): weighted by each log row's
    `learned_tokens` when every row has them (`TokenWeightedTrainLoss`), else by its steps.

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
