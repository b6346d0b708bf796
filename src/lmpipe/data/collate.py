"""Collators: packed causal-LM blocks (document-aware or not), and QA rows either padded per batch or padding-free."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedTokenizerBase

from lmpipe.loss.reference import IGNORE_INDEX


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; labels are the inputs unshifted (the model shifts inside).

    Not DataCollatorForLanguageModeling: it masks every label equal to pad_token_id, and GPT-2 pads with EOS.
    No attention mask: blocks carry no padding, and without one SDPA takes its fast causal path.
    """
    input_ids = torch.from_numpy(np.stack([np.asarray(f["input_ids"]) for f in features]).astype(np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def document_position_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Positions that restart at 0 on the token after every EOS: an EOS ends its document, the next token starts
    one (a block's first token starts at 0 too, as in any block). [a b EOS c EOS d] -> [0 1 2 0 1 0]."""
    index = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    return index - torch.where(starts, index, 0).cummax(dim=-1).values


@dataclass(frozen=True)
class DocumentBlocks:
    """`collate_blocks` plus `position_ids` restarting after every EOS, and still no attention mask: from such
    position ids transformers builds a block-diagonal causal mask (sdpa and eager), so no token attends across a
    document boundary, and `wpe` sees each document's own positions. Only without a KV cache (build_model and the
    Trainer's `use_cache: false` keep it off) and without an attention mask, which would make transformers skip the
    packed-sequence check: `tests/test_document_attention.py` checks both.

    Labels are unchanged: the EOS that ends a document still predicts the next document's first token, so the same
    tokens are learned and scored as without document attention and the two runs' losses compare."""

    eos_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_blocks(features)
        batch["position_ids"] = document_position_ids(batch["input_ids"], self.eos_token_id)
        return batch


def blocks_collator(document_attention: bool, eos_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The recipe's `document_attention`: `DocumentBlocks`, or plain `collate_blocks`."""
    return DocumentBlocks(eos_token_id) if document_attention else collate_blocks


def padded_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Dynamic padding to the longest row of the batch, on the right; labels are padded with -100 by position.

    GPT-2 has no pad token, so a private copy of the tokenizer pads with EOS: the attention mask and the -100
    labels exclude padding by position, never by id, so each answer's own EOS is still learned.
    """
    padder = copy.deepcopy(tokenizer)
    padder.pad_token = padder.eos_token
    padder.padding_side = "right"
    return DataCollatorForSeq2Seq(padder, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def padding_free_collator() -> DataCollatorWithFlattening:
    """The whole batch as one row with `position_ids` restarting at 0 per example and no attention mask.

    From the position ids transformers builds a block-diagonal causal mask (sdpa and eager) when no KV cache is
    built (build_model turns it off), so no token attends to another example; tests/test_qa_data.py checks it.
    """
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def qa_collator(tokenizer: PreTrainedTokenizerBase, batching: str):
    """The recipe's `batching`: `padded` or `packed` (padding-free)."""
    return padding_free_collator() if batching == "packed" else padded_collator(tokenizer)


def real_token_fraction(row_lengths: Sequence[int], batches: Iterable[Sequence[int]], batching: str) -> float:
    """Share of the token positions the model computes that hold real tokens, from the rows' lengths and each
    batch's row indices, without collating: a padded batch computes its longest row for every row; a packed one
    (padding-free) only its own tokens."""
    if batching == "packed":
        return 1.0
    real = computed = 0
    for batch in batches:
        lengths = [row_lengths[index] for index in batch]
        real += sum(lengths)
        computed += max(lengths) * len(lengths)
    return real / computed if computed else float("nan")
