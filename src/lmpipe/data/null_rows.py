"""A missing value in the text column (`null` in JSON, an empty CSV cell) is named by file and row before
tokenisation, which would otherwise fail on it with a TypeError deep inside `datasets.map`."""

from __future__ import annotations

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from lmpipe.errors import LmpipeError


def first_null_row(split: Dataset, column: str) -> int | None:
    """The 0-based index of the first row whose `column` is missing (an Arrow null), or None."""
    if column not in split.column_names:
        return None  # check_text_column names a missing column
    values = split.data.column(column)
    if not values.null_count:
        return None
    return pc.index(pc.is_null(values), True).as_py()


def check_no_null_text(corpus: DatasetDict, column: str, sources: dict[str, str]) -> None:
    """Raise `SOURCE row N: column 'text' is null` (N counted from 1, as the file's data rows)."""
    for name, split in corpus.items():
        row = first_null_row(split, column)
        if row is not None:
            raise LmpipeError(f"{sources.get(name, name)} row {row + 1}: column '{column}' is null (no text)")
