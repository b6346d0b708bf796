"""The manual causal-LM cross-entropy, written from first principles so it can check the model's own loss."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of `labels[:, 1:]` under `logits[:, :-1]`, and the mask of kept (label != -100) positions.

    Labels are never pre-shifted: position t predicts label t+1. Computed in float32 whatever the logits' dtype.
    """
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    kept = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(shifted_logits, dim=-1)
    target_log_probs = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -target_log_probs * kept, kept


def manual_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every kept shifted label token of the batch (token-weighted, not a mean of row means)."""
    nll, kept = shifted_token_nll(logits, labels)
    return nll.sum() / kept.sum()
