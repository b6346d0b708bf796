"""Exact perplexity of a saved model on a text file: non-overlapping blocks, or the sliding window.

The text is tokenised and packed as for training (EOS after every document, the final partial block dropped), so
scoring a run's validation file with its block size reproduces the run's `eval_loss`. With `stride` S < block
size B, windows of B tokens start every S tokens, as in the transformers perplexity guide: each token after the
first is scored exactly once, with at least B - S tokens of context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import PartialState
from datasets import DatasetDict
from transformers import PreTrainedModel

from lmpipe.data.null_rows import check_no_null_text
from lmpipe.data.packing import flat_token_ids, tokenize_documents, whole_blocks
from lmpipe.data.sources import check_text_column, load_local_file
from lmpipe.errors import LmpipeError
from lmpipe.finite import non_finite_metrics
from lmpipe.losses import IGNORE_INDEX
from lmpipe.metrics import NllStatistics, exact_metrics, token_byte_lengths
from lmpipe.model import load_pretrained
from lmpipe.model_checks import check_model_files, check_vocab
from lmpipe.model_loss import install_chunked_loss, token_scores
from lmpipe.recipe import TokenizerArguments
from lmpipe.tokenizer import load_tokenizer


@dataclass
class EvaluateArguments:
    """Flags of `pipelines/perplexity.py` / `lmpipe perplexity`."""

    # Optional here only so that a recipe file may hold them (it is parsed alone first); evaluate_file requires them.
    model_name_or_path: str | None = field(default=None, metadata={"help": "Saved model directory or Hub id."})
    validation_file: str | None = field(default=None, metadata={"help": "Text to score: .txt/.json/.csv/..."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per window (default: n_positions)."})
    stride: int | None = field(
        default=None, metadata={"help": "Sliding-window step (default: block_size, non-overlapping blocks)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a .txt file splits into documents.", "choices": ["line", "paragraph", "document"]},
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    chunked_loss: bool = field(
        default=True, metadata={"help": "Score from the hidden states a chunk of tokens at a time, never the full logits."}
    )
    chunked_loss_tokens: int | None = field(default=None, metadata={"help": "Tokens per loss chunk (default: derived)."})


def window_sizes(block_size: int | None, stride: int | None, n_positions: int) -> tuple[int, int]:
    """(block size, stride) with the defaults filled in; a stride over the block would skip tokens."""
    block_size = n_positions if block_size is None else block_size
    stride = block_size if stride is None else stride
    if not 2 <= block_size <= n_positions:
        raise LmpipeError(f"block_size={block_size} must be between 2 and the model's n_positions={n_positions}")
    if not 1 <= stride <= block_size:
        raise LmpipeError(f"stride={stride} must be between 1 and block_size={block_size}")
    return block_size, stride


def sliding_windows(ids: torch.Tensor, block_size: int, stride: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The guide's windows as (input_ids, labels) groups of equal length: the full windows, then a shorter last one.

    In every window but the first, the first block_size - stride labels are -100: the window before scored them.
    With stride == block_size these are exactly the non-overlapping blocks.
    """
    full = ids.unfold(0, block_size, stride)  # starts 0, S, 2S, ... while a whole window fits
    labels = full.clone()
    labels[1:, : block_size - stride] = IGNORE_INDEX
    groups = [(full, labels)]
    scored_up_to = (len(full) - 1) * stride + block_size
    if scored_up_to < len(ids):
        tail = ids[len(full) * stride :].unsqueeze(0)
        tail_labels = tail.clone()
        tail_labels[:, : block_size - stride] = IGNORE_INDEX
        groups.append((tail, tail_labels))
    return groups


def score_windows(
    model: PreTrainedModel, groups: list[tuple[torch.Tensor, torch.Tensor]], byte_lengths: np.ndarray, batch_size: int
) -> np.ndarray:
    """Per-window (summed NLL, scored tokens, scored bytes) rows, as the Trainer's exact evaluation collects them."""
    statistics = NllStatistics(byte_lengths)
    device = model.device
    rows = []
    with torch.inference_mode():
        for inputs, labels in groups:
            for batch_inputs, batch_labels in zip(inputs.split(batch_size), labels.split(batch_size)):
                scores = token_scores(model, batch_inputs.contiguous().to(device), batch_labels.to(device))
                rows.append(statistics(scores, batch_labels.to(device)).cpu())
    return torch.cat(rows).numpy()


def evaluate_file(args: EvaluateArguments) -> dict[str, float | int]:
    """Exact loss, perplexity, scored tokens and bits per byte of the model on the file."""
    for name in ("model_name_or_path", "validation_file"):
        if not getattr(args, name):
            raise LmpipeError(f"--{name} is required")
    if args.batch_size < 1:
        raise LmpipeError(f"batch_size must be >= 1, got {args.batch_size}")
    check_model_files(args.model_name_or_path, ("config", "weights", "tokenizer"))
    documents = load_local_file(args.validation_file, args.sample_by)
    check_text_column(DatasetDict({"validation": documents}), args.text_column, args.validation_file)
    check_no_null_text(DatasetDict({"validation": documents}), args.text_column, {"validation": args.validation_file})
    tokenizer = load_tokenizer(TokenizerArguments(), args.model_name_or_path)
    model = load_pretrained(args.model_name_or_path).eval()
    install_chunked_loss(model, args.chunked_loss, args.chunked_loss_tokens)
    check_vocab(model, tokenizer, allow_resize=False, name=args.model_name_or_path)
    block_size, stride = window_sizes(args.block_size, args.stride, model.config.n_positions)
    tokenized = tokenize_documents(documents, tokenizer, args.text_column)
    blocks = whole_blocks(flat_token_ids(tokenized), block_size, args.validation_file)
    ids = torch.from_numpy(blocks.reshape(-1).astype(np.int64))
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    model.to(PartialState().device)
    metrics = exact_metrics(score_windows(model, sliding_windows(ids, block_size, stride), byte_lengths, args.batch_size))
    result = {
        "eval_loss": metrics["exact_loss"],
        "perplexity": metrics["perplexity"],
        "eval_tokens": metrics["tokens"],
        "bits_per_byte": metrics["bits_per_byte"],
        "block_size": block_size,
        "stride": stride,
    }
    not_finite = non_finite_metrics(result)
    if not_finite:  # JSON has no number for NaN or inf: fail rather than print an invalid line
        raise LmpipeError(
            f"{args.model_name_or_path}: {', '.join(not_finite)} on {args.validation_file} is not finite (NaN or inf)"
        )
    return result
