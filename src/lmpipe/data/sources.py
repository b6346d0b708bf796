"""Load a corpus from the Hub, local files or Python's own docs, with clear errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, Value, load_dataset

from lmpipe.errors import LmpipeError, not_found

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PYDOC = "builtin:pydoc"
# Characters the text builder reads at a time when streaming (datasets' default, 10 MB, sets the streamed peak RSS).
STREAMING_TEXT_CHUNK = 1 << 20


def pydoc_documents() -> list[str]:
    """Python's documentation topics (`pydoc_data`, shipped with CPython): real English text, no download."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def load_local_file(path: str, sample_by: str = "paragraph", streaming: bool = False) -> Dataset | IterableDataset:
    """One local file as a Dataset (or a lazy IterableDataset); `.txt` splits by line, paragraph or whole file."""
    file = Path(path)
    if file.is_dir():
        raise LmpipeError(f"{path}: a directory, not a data file")
    if not file.is_file():
        raise not_found(path, "data file")
    try:
        with file.open("rb") as handle:
            handle.read(1)
    except OSError as e:
        raise LmpipeError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    if file.stat().st_size == 0:
        raise LmpipeError(f"{path}: data file is empty")
    builder = BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise LmpipeError(f"{path}: unsupported extension; use one of {', '.join(sorted(BUILDERS))}")
    if builder == "text":
        _check_utf8(file)
    options = {"sample_by": sample_by} if builder == "text" else {}
    if builder == "text" and streaming:
        options["chunksize"] = STREAMING_TEXT_CHUNK
    try:
        dataset = load_dataset(builder, data_files={"data": str(file)}, split="data", streaming=streaming, **options)
    except Exception as e:  # datasets wraps parser errors in DatasetGenerationError; the cause says what broke
        cause = e.__cause__ or e
        problem = f"cannot parse as {builder} ({first_line(cause)})"
        if file.suffix.lower() == ".jsonl":  # pyarrow counts rows from 0 within a block: name the file's line
            problem = first_bad_json_line(file) or problem
        raise LmpipeError(f"{path}: {problem}") from None
    if not streaming and len(dataset) == 0:
        raise LmpipeError(f"{path}: no rows")
    if builder == "json" and not streaming and _holds_json(dataset.features):
        mixed = first_mixed_row(file, dataset.features)
        raise LmpipeError(f"{path} {mixed}" if mixed else f"{path}: a column holds values of different types")
    return dataset


def _holds_json(feature) -> bool:
    """Whether a feature is, or holds, datasets' `Json`: what datasets 5 makes of a JSON column whose rows hold
    different types. Its values are not what the file says (the text "0" comes back as the number 0)."""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_holds_json(f) for f in feature.values())
    return _holds_json(feature.feature) if hasattr(feature, "feature") else False


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    names = {str: "text", int: "a number", float: "a number", list: "a list", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


def _json_kinds(value, feature, where: str):
    """(where, kind) of each value under a `Json` part of `feature`, read from the file's own row."""
    if type(feature).__name__ == "Json":
        if value is not None:
            yield where, _kind(value)
    elif isinstance(feature, dict) and isinstance(value, dict):
        for key, sub in feature.items():
            yield from _json_kinds(value.get(key), sub, f"{where} '{key}'" if where else f"column '{key}'")
    elif hasattr(feature, "feature") and isinstance(value, list):
        for number, item in enumerate(value, start=1):
            yield from _json_kinds(item, feature.feature, f"{where} item {number}")


def first_mixed_row(file: Path, features) -> str | None:
    """The first row (from 1) whose value under a mixed column is of another kind than the first row's, read from
    the file: one kind per column (and per key of a column's mappings, e.g. every turn's 'content')."""
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except ValueError:
        rows = None
    if not isinstance(rows, list):  # JSON Lines (a .json file may be either)
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    first: dict[str, tuple[str, int]] = {}
    for number, row in enumerate(rows, start=1):
        for where, kind in _json_kinds(row, features, ""):
            field = re.sub(r" item \d+", "", where)  # every item of a list is one field
            seen, seen_row = first.setdefault(field, (kind, number))
            if kind != seen:
                return f"row {number}: {where} holds {kind} where row {seen_row} holds {seen} (one type per column)"
    return None


def _check_utf8(file: Path) -> None:
    """Name the first bad byte: the text builder would otherwise fail deep inside a worker."""
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmpipeError(f"{file}: line {number} is not UTF-8 (byte {e.start})") from None


def first_bad_json_line(file: Path, text_column: str | None = None) -> str | None:
    """The first line that is not one JSON value (or whose `text_column` is not text), numbered from 1 as an
    editor shows it."""
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.strip())
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                return f"line {number} is not valid JSON ({getattr(e, 'msg', None) or first_line(e)})"
            value = row.get(text_column) if text_column and isinstance(row, dict) else ""
            if not isinstance(value, str):
                return f"line {number}: column '{text_column}' holds {type(value).__name__}, not text"
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_corpus(
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    sample_by: str = "paragraph",
    streaming: bool = False,
) -> DatasetDict | IterableDatasetDict:
    """The raw corpus with `train` and, when the source has one, `validation`; lazy splits when `streaming`."""
    if train_file:
        splits = {"train": load_local_file(train_file, sample_by, streaming)}
        if validation_file:
            splits["validation"] = load_local_file(validation_file, sample_by, streaming)
    elif validation_file:
        raise LmpipeError("validation_file needs a train_file")
    elif dataset_name == PYDOC:
        documents = Dataset.from_dict({"text": pydoc_documents()})
        splits = {"train": documents.to_iterable_dataset() if streaming else documents}
    elif not dataset_name:
        raise LmpipeError("no data: set train_file or dataset_name")
    else:
        try:
            loaded = load_dataset(dataset_name, dataset_config_name, streaming=streaming)
        except Exception as e:  # offline, unknown id, bad config: all surface as different exception types
            raise LmpipeError(f"dataset {dataset_name}: cannot load ({first_line(e)})") from None
        splits = {name: split for name, split in loaded.items() if name in ("train", "validation")}
    return IterableDatasetDict(splits) if streaming else DatasetDict(splits)


def split_validation(corpus: DatasetDict, percentage: float, source: str) -> DatasetDict:
    """Hold out the last `percentage`% of documents (contiguous, like nanoGPT) when there is no validation split."""
    if "train" not in corpus:
        raise LmpipeError(f"{source}: has no train split")
    if "validation" in corpus:
        return corpus
    if not 0 < percentage < 100:
        raise LmpipeError(f"validation_split_percentage must be in (0, 100), got {percentage}")
    train = corpus["train"]
    held_out = max(1, int(len(train) * percentage / 100))
    if held_out >= len(train):
        raise LmpipeError(f"{source}: {len(train)} documents are too few to hold out {percentage}% for validation")
    cut = len(train) - held_out
    return DatasetDict({"train": train.select(range(cut)), "validation": train.select(range(cut, len(train)))})


def _is_text(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def check_text_column(corpus: DatasetDict, column: str, source: str, lists_too: bool = False) -> None:
    """The column exists in every split and holds text (or, with `lists_too`, lists of text)."""
    for name, split in corpus.items():
        if column not in split.column_names:
            raise LmpipeError(
                f"{source} ({name}): no column '{column}'; columns are {', '.join(split.column_names)}"
            )
        feature = split.features[column]
        if _is_text(feature) or (lists_too and _is_text(getattr(feature, "feature", None))):
            continue
        kind = getattr(feature, "dtype", None) or feature
        expected = "text or lists of text" if lists_too else "text"
        raise LmpipeError(f"{source} ({name}): column '{column}' holds {kind} values, not {expected}")
