"""Cache keys for `Dataset.map` over a tokenizer: datasets' own fingerprint pickles the whole tokenizer (seconds
for GPT-2's, on every map call); its serialised JSON, the input's fingerprint and the transform's code say the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase


def tokenized_fingerprint(
    split: Dataset, tokenizer: PreTrainedTokenizerBase, code_file: str, *settings: Any
) -> str | None:
    """A fingerprint for `split.map(...)` that changes with the data, the tokenizer, the code and the settings;
    None (datasets hashes as usual) for a tokenizer with no Rust backend to serialise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    special = sorted(tokenizer.all_special_tokens)
    return Hasher.hash([split._fingerprint, backend.to_str(), special, Path(code_file).read_bytes(), *settings])


def map_tokenized(
    split: Dataset, encode, tokenizer: PreTrainedTokenizerBase, num_proc: int | None, desc: str, code_file: str,
    *settings: Any,
) -> Dataset:
    """`split.map(encode)` batched with row indices (for errors naming a row), the input columns replaced, and the
    cache keyed by `tokenized_fingerprint`: the one way QA pairs and conversations are tokenised."""
    return split.map(
        encode,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        remove_columns=split.column_names,
        desc=desc,
        new_fingerprint=tokenized_fingerprint(split, tokenizer, code_file, *settings),
    )
