"""Exact evaluation: token-weighted perplexity and bits per byte summed over every batch and rank."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lmpipe.loss.reference import IGNORE_INDEX, shifted_token_nll

NATS_PER_BIT = math.log(2)


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens and padded rows), for bits per byte."""
    size = size or len(tokenizer)
    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    lengths = np.zeros(size, dtype=np.int64)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or token is None:
            continue
        if all(char in byte_of_char for char in token):  # byte-level BPE: one char per byte
            lengths[token_id] = len(token)
        else:
            lengths[token_id] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths


class NllStatistics:
    """`preprocess_logits_for_metrics`: reduce each row's logits to (summed NLL, scored tokens, scored bytes).

    The Trainer then gathers these rows over ranks with `gather_for_metrics`, which drops the samples it
    duplicated to even out the last batch, so every real example is counted exactly once.
    """

    def __init__(self, byte_lengths: np.ndarray):
        self.byte_lengths = torch.as_tensor(byte_lengths)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits` [batch, seq, vocab], or [batch, seq] per-token NLL from the chunked loss (`token_nll`)."""
        if isinstance(logits, tuple):
            logits = logits[0]
        if logits.dim() == 2:  # masked again: the Trainer pads a rank's rows to the longest rank's with -100
            kept = labels[:, 1:] != IGNORE_INDEX
            nll = logits[:, :-1].float() * kept
        else:
            nll, kept = shifted_token_nll(logits, labels)
        targets = labels[:, 1:].clamp_min(0)
        byte_lengths = self.byte_lengths.to(targets.device)[targets] * kept
        return torch.stack(
            [nll.double().sum(-1), kept.sum(-1).double(), byte_lengths.sum(-1).double()], dim=-1
        )


def exact_metrics(row_statistics: np.ndarray) -> dict[str, float]:
    """Perplexity = exp(total NLL / total scored tokens); bits per byte = total NLL / ln 2 / total bytes."""
    statistics = np.asarray(row_statistics, dtype=np.float64).reshape(-1, 3)
    nll, tokens, n_bytes = statistics.sum(axis=0)
    if tokens == 0:
        return {"exact_loss": float("nan"), "perplexity": float("nan"), "tokens": 0, "bits_per_byte": float("nan")}
    loss = nll / tokens
    return {
        "exact_loss": float(loss),
        "perplexity": float(math.exp(loss)),
        "tokens": int(tokens),
        "bits_per_byte": float(nll / NATS_PER_BIT / n_bytes) if n_bytes else float("nan"),
    }


def compute_exact_metrics(prediction) -> dict[str, float]:
    """`compute_metrics` for the Trainer: its predictions are the rows from NllStatistics."""
    return exact_metrics(prediction.predictions)


def unigram_perplexity(train_ids: np.ndarray, eval_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on the train tokens, scored on the eval blocks' targets."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    targets = np.asarray(eval_blocks)[:, 1:].reshape(-1)
    return float(math.exp(-log_probs[targets].mean()))
