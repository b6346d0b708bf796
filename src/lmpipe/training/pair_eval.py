"""Exact DPO evaluation: every statistic TRL's DPOTrainer logs for the held-out pairs, weighted by pairs (or by
answer tokens) over the whole eval set and all ranks.

TRL 1.16 appends one value per eval batch (gathered over ranks with the pairs accelerate repeats to even out the
last batch) and averages those values, so a short last batch weighs as much as a full one. Its per-pair values never
leave `DPOTrainer._compute_loss`, so each batch's mean is taken back to a sum: every rank scores only its own real
pairs, with TRL's gathers kept local, and the sums and their weights are added over batches, then over ranks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import Accelerator

# TRL's token-weighted statistics and the answer tokens each is a mean over (the rest are means over pairs).
TOKEN_WEIGHTED = {
    "entropy": "all",
    "logits/chosen": "chosen",
    "logits/rejected": "rejected",
    "mean_token_accuracy": "chosen",
}
NOT_EVALUATION = ("num_tokens",)  # TRL's count of training tokens, not a statistic of the held-out pairs


def real_pairs(local_pairs: int, accelerator: Accelerator) -> int:
    """How many of this rank's pairs in the current eval batch belong to the eval set: on the last batch accelerate
    fills every rank's batch with pairs from the start, and the first `remainder` pairs over the ranks, in rank
    order, are the real ones (what `gather_for_metrics` keeps)."""
    state = accelerator.gradient_state
    if not state.end_of_dataloader or state.remainder <= 0:
        return local_pairs
    return min(local_pairs, max(0, state.remainder - accelerator.process_index * local_pairs))


def first_pairs(inputs: dict, pairs: int) -> dict:
    """The first `pairs` pairs of a batch from TRL's collator: rows [chosen..., rejected...], or one per pair."""
    batch = inputs["input_ids"].shape[0] // 2
    if pairs == batch:
        return inputs

    def keep(value):
        if not torch.is_tensor(value) or value.dim() == 0:
            return value
        if value.shape[0] == 2 * batch:
            return torch.cat([value[:pairs], value[batch : batch + pairs]])
        return value[:pairs] if value.shape[0] == batch else value

    return {key: keep(value) for key, value in inputs.items()}


@contextmanager
def local_gathers(accelerator: Accelerator):
    """Within it `gather` and `gather_for_metrics` return this rank's own values: the ranks may then score different
    numbers of pairs, and their sums are added once at the end (`PairWeightedSums.means`)."""
    accelerator.gather = accelerator.gather_for_metrics = lambda data, *args, **kwargs: data
    try:
        yield
    finally:
        del accelerator.gather, accelerator.gather_for_metrics


class PairWeightedSums:
    """Sums of TRL's eval statistics, each batch's mean times its pairs (or answer tokens), and the weights."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, loss: float, means: dict[str, float], inputs: dict, pairs: int) -> None:
        """One batch of `pairs` pairs: its `loss` and TRL's `means` for it; `inputs` as scored (their tokens)."""
        answer = inputs["completion_mask"][:, 1:]  # TRL's: the first position predicts nothing
        chosen, rejected = (int(rows.sum()) for rows in answer.chunk(2))
        tokens = {"all": chosen + rejected, "chosen": chosen, "rejected": rejected}
        for key, mean in {"loss": loss, **means}.items():
            if key in NOT_EVALUATION:
                continue
            weight = tokens[TOKEN_WEIGHTED[key]] if key in TOKEN_WEIGHTED else pairs
            self.sums[key] = self.sums.get(key, 0.0) + (mean * weight if pairs else 0.0)
            self.weights[key] = self.weights.get(key, 0.0) + (weight if pairs else 0.0)

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Sums over the ranks, then sum / weight per statistic (every rank scored every batch, so every rank has
        the same keys)."""
        keys = sorted(self.sums)
        totals = torch.tensor([[self.sums[k] for k in keys], [self.weights[k] for k in keys]], dtype=torch.float64)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        return {key: (s / w).item() if w else float("nan") for key, s, w in zip(keys, *totals)}
