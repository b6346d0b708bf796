"""Exact perplexity and bits per byte against independent computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmpipe.loss.reference import manual_causal_lm_loss
from lmpipe.training.exact_eval import NllStatistics, exact_metrics, token_byte_lengths


def test_manual_loss_matches_worked_example():
    logits = torch.tensor([[2.0, 0.5, 0.1, -1.0], [0.1, 0.2, 3.0, 0.5], [1.0, 2.0, 0.1, 0.0]])
    targets = torch.tensor([0, 2, 1])
    # one row of 4 positions: position t predicts label t+1, so put the targets at labels[1:]
    batch_logits = torch.cat([logits, torch.zeros(1, 4)]).unsqueeze(0)
    labels = torch.tensor([[-100, 0, 2, 1]])
    assert manual_causal_lm_loss(batch_logits, labels).item() == pytest.approx(F.cross_entropy(logits, targets).item())
    by_hand = -sum(math.log(math.exp(r[t]) / sum(math.exp(v) for v in r))
                   for r, t in zip(logits.tolist(), [0, 2, 1])) / 3
    assert manual_causal_lm_loss(batch_logits, labels).item() == pytest.approx(by_hand, rel=1e-6)


def test_exact_perplexity_is_the_token_mean_not_the_batch_mean():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, 30)
    labels = torch.randint(0, 30, (6, 10))
    labels[:3, :8] = -100  # first batch scores 3 x 2 shifted tokens, second batch 3 x 9
    statistics = NllStatistics(np.ones(30, dtype=np.int64))
    rows = torch.cat([statistics(logits[:3], labels[:3]), statistics(logits[3:], labels[3:])]).numpy()
    metrics = exact_metrics(rows)
    token_mean = manual_causal_lm_loss(logits, labels).item()
    batch_mean = (manual_causal_lm_loss(logits[:3], labels[:3])
                  + manual_causal_lm_loss(logits[3:], labels[3:])).item() / 2
    assert metrics["exact_loss"] == pytest.approx(token_mean, rel=1e-6)
    assert abs(metrics["exact_loss"] - batch_mean) > 1e-3
    assert metrics["perplexity"] == pytest.approx(math.exp(token_mean))
    assert metrics["tokens"] == 3 * 2 + 3 * 9
    assert metrics["bits_per_byte"] == pytest.approx(token_mean / math.log(2))  # one byte per token here


def test_token_byte_lengths_match_decoded_text(gpt2_tokenizer):
    lengths = token_byte_lengths(gpt2_tokenizer)
    text = "Perplexity per byte: naïve café, 東京!"
    ids = gpt2_tokenizer.encode(text)
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[gpt2_tokenizer.eos_token_id] == 0
