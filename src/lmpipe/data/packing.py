"""Causal-LM packing: every document ends with EOS; the concatenation is cut into `block_size` blocks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, IterableDataset, List, Value
from transformers import PreTrainedTokenizerBase

from lmpipe.errors import LmpipeError
from lmpipe.model.tokenizer import plain_text_ids


def tokenize_documents(
    documents: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    num_proc: int | None = None,
    keep: tuple[str, ...] = (),
) -> Dataset | IterableDataset:
    """Token ids of each document followed by EOS (batched; cached by `datasets`, or lazy for a stream); a
    stream's columns in `keep` (e.g. a mixture's `source`) stay beside `input_ids`.

    A document that quotes `<|endoftext|>` keeps it as text: the only EOS ids are the ones added here.
    """
    eos = tokenizer.eos_token_id

    def encode(batch):
        return {"input_ids": [doc + [eos] for doc in plain_text_ids(tokenizer, batch[text_column])]}

    # A streamed IterableDataset takes neither num_proc nor desc, and may not know its columns yet. In memory the
    # ids are int32, not datasets' default int64: half the cache to write and read (every vocabulary fits).
    options = (
        {"num_proc": num_proc, "desc": "Tokenising", "features": Features({"input_ids": List(Value("int32"))})}
        if isinstance(documents, Dataset)
        else {}
    )
    removed = [column for column in documents.column_names or [text_column] if column not in keep]
    return documents.map(encode, batched=True, remove_columns=removed, **options)


def flat_token_ids(tokenized: Dataset) -> np.ndarray:
    """All token ids in document order as one int32 array, without a Python loop over tokens."""
    column = tokenized.data.column("input_ids").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def whole_blocks(ids: np.ndarray, block_size: int, split: str = "train") -> np.ndarray:
    """The flat ids cut into (n_blocks, block_size); only the final partial block is dropped."""
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise LmpipeError(f"{split} split has {len(ids)} tokens, fewer than one block of block_size={block_size}")
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size)


def blocks_dataset(blocks: np.ndarray) -> Dataset:
    """(n_blocks, block_size) ids as a Dataset with one fixed-size `input_ids` list per row."""
    column = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), blocks.shape[1])
    return Dataset(pa.table({"input_ids": column}))


def pack_blocks(tokenized: Dataset, block_size: int, split: str = "train") -> Dataset:
    """Fixed-size blocks over the whole concatenation of the tokenised documents."""
    return blocks_dataset(whole_blocks(flat_token_ids(tokenized), block_size, split))


def blocks_as_array(packed: Dataset) -> np.ndarray:
    """The packed blocks as an (n_blocks, block_size) array."""
    column = packed.data.column("input_ids").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(packed), -1)
