"""Token-weighted train loss for rows of different lengths (QA pairs, conversations).

The Trainer logs the mean of per-step losses; each step's loss is already total NLL / learned tokens of that step
(`num_items_in_batch`), but steps with 40 learned tokens and with 4 count the same. Here every logged `loss` is the
total NLL / total learned tokens since the previous log, and each log row carries `learned_tokens`, so the run's
`train_loss` (callbacks.mean_train_loss) weights every step by its learned tokens, across resumes too.
"""

from __future__ import annotations

import torch

from lmpipe.training.trainer import ExactEvalTrainer


class TokenWeightedLossTrainer(ExactEvalTrainer):
    """ExactEvalTrainer whose logged train loss weights steps by their learned (non -100, shifted) label tokens."""

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
