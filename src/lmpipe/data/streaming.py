"""Corpora larger than memory: documents are read lazily, tokenised and packed into blocks as training asks.

Ranks: the Trainer hands this IterableDataset to accelerate, whose default for iterable datasets is
`dispatch_batches`: global rank 0 alone reads the stream and sends every rank its slice of each global batch. So
ranks never overlap, no block is lost, and the order of blocks is the one a single-rank run sees. (The
alternative, `split_dataset_by_node`, gives each rank whole files or every n-th document: a single file would be
read by every rank, and a rank whose share ends first would start a new epoch while the others are mid-stream.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase, TrainingArguments

from lmpipe.config.arguments import DataArguments
from lmpipe.data.packing import tokenize_documents
from lmpipe.data.sources import check_text_column, first_bad_json_line, first_line, load_corpus
from lmpipe.errors import LmpipeError

# Tokens gathered before cutting blocks: big enough for vectorised cuts, small enough to keep memory flat.
FLUSH_TOKENS = 1 << 16


def check_streaming_arguments(training: TrainingArguments) -> None:
    """A stream has no length, so the Trainer cannot count epochs: the run's length must be max_steps."""
    if training.max_steps <= 0:
        raise LmpipeError("streaming: true needs max_steps > 0 (a stream has no length to count epochs in)")


# A local file a stream reads, to search when the stream fails: (name in the error, path, its text column).
ReadFile = tuple[str, str, str]


@contextmanager
def named_read_errors(source: str, text_column: str, files: list[ReadFile] | None = None):
    """A bad row met mid-stream, named by its line in a local JSON Lines file (datasets and pyarrow count rows
    within a chunk), or else by the stream and the reader's own first line; never a traceback from a worker.
    `files`: the files of a stream that reads several (a mixture); by default `source` is the one file."""
    try:
        yield
    except (ValueError, TypeError, DatasetGenerationError) as e:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(e, LmpipeError):
            raise
        for name, file, column in files or [(source, source, text_column)]:
            path = Path(file)
            located = path.suffix.lower() == ".jsonl" and path.is_file() and first_bad_json_line(path, column)
            if located:
                raise LmpipeError(f"{name}: {located}") from None
        raise LmpipeError(f"{source}: cannot read the stream ({first_line(e)})") from None


def stream_texts(
    documents: IterableDataset, text_column: str, source: str, files: list[ReadFile] | None = None
) -> Iterator[str]:
    """The documents' texts, e.g. to train a tokenizer on; a non-text value is named like any bad row."""
    with named_read_errors(source, text_column, files):
        for row in documents:
            text = row[text_column]
            if not isinstance(text, str):
                raise TypeError(f"column '{text_column}' holds {type(text).__name__}, not text")
            yield text


def stream_documents(data: DataArguments, source: str) -> tuple[IterableDataset, Dataset]:
    """The train documents as a lazy stream, and the validation documents in memory for exact evaluation.

    Validation is `validation_file` or the source's own validation split; otherwise the first
    `streaming_validation_documents` documents of the stream (the head, since a stream's tail is unknown
    until read), which training then skips.
    """
    corpus = load_corpus(
        data.dataset_name, data.dataset_config_name, data.train_file, data.validation_file, data.sample_by,
        streaming=True,
    )
    if "train" not in corpus:
        raise LmpipeError(f"{source}: has no train split")
    train = corpus["train"].take(data.max_train_documents) if data.max_train_documents else corpus["train"]
    if "validation" in corpus:
        with named_read_errors(data.validation_file or source, data.text_column):
            validation = Dataset.from_list(list(corpus["validation"]))
        if len(validation) == 0:
            raise LmpipeError(f"{data.validation_file or source}: the validation split has no rows")
    else:
        held_out = data.streaming_validation_documents
        with named_read_errors(source, data.text_column):
            validation = Dataset.from_list(list(train.take(held_out)))
        train = train.skip(held_out)
    check_text_column(DatasetDict({"validation": validation}), data.text_column, source)
    with named_read_errors(source, data.text_column):
        first = next(iter(train.take(1)), None)
    if first is None:
        raise LmpipeError(f"{source}: no training documents left after holding out validation")
    check_text_column(DatasetDict({"train": Dataset.from_list([first])}), data.text_column, source)
    return train, validation


class PackedStream(torch.utils.data.IterableDataset):
    """`block_size` blocks of the stream's EOS-terminated documents, in corpus order; only the final tail is dropped.

    Blocks are the ones `packing.pack_blocks` cuts from the same documents in memory. Inside DataLoader workers,
    `datasets` gives each worker whole shards (files) of the stream, and each worker packs its own.
    """

    def __init__(
        self,
        documents: IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        text_column: str,
        block_size: int,
        source: str = "train stream",
        files: list[ReadFile] | None = None,
    ):
        self.documents = documents
        self.source = source
        self.files = files
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.block_size = block_size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        # A generator, not IterableDataset.map(batched=True): map cannot carry a batch's remainder into the next.
        pending: list[list[int]] = []
        pending_tokens = 0
        carry = np.empty(0, dtype=np.int32)
        with named_read_errors(self.source, self.text_column, self.files):
            for row in tokenize_documents(self.documents, self.tokenizer, self.text_column):
                pending.append(row["input_ids"])
                pending_tokens += len(row["input_ids"])
                if pending_tokens >= FLUSH_TOKENS:
                    carry = yield from self._cut(carry, pending)
                    pending, pending_tokens = [], 0
        yield from self._cut(carry, pending)

    def _cut(self, carry: np.ndarray, documents: list[list[int]]):
        """Yield every whole block of `carry` + `documents`; return the remainder to carry into the next cut."""
        ids = np.concatenate([carry, *(np.asarray(doc, dtype=np.int32) for doc in documents)])
        whole = len(ids) - len(ids) % self.block_size
        for block in ids[:whole].reshape(-1, self.block_size):
            yield {"input_ids": block}
        return ids[whole:]

    def head_ids(self, max_tokens: int) -> np.ndarray:
        """The token ids of the stream's first blocks, up to `max_tokens` (e.g. to fit the unigram baseline)."""
        blocks = []
        for row in self:
            blocks.append(row["input_ids"])
            if len(blocks) * self.block_size >= max_tokens:
                break
        if not blocks:
            raise LmpipeError(f"train stream has fewer tokens than one block of block_size={self.block_size}")
        return np.concatenate(blocks)
