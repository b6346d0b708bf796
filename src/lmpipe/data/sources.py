"""Load a corpus from the Hub, local files or Python's own docs, with clear errors for bad files."""

from __future__ import annotations

import json
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
    return dataset


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


def _is_mixed(feature) -> bool:
    """datasets (5.x) reads a JSON column whose rows hold different types (text here, a number or list there) as
    `Json`, decoded row by row; older releases fail to read the file instead."""
    return type(feature).__name__ == "Json"


def check_text_column(
    corpus: DatasetDict,
    column: str,
    source: str,
    lists_too: bool = False,
    sources: dict[str, str] | None = None,
    mixed_ok: bool = False,
) -> None:
    """The column exists in every split and holds text (or, with `lists_too`, lists of text).

    A column of mixed types is named by its first row that is not text (from 1, the split's own file as
    `sources` names it), or with `mixed_ok` left to a caller that checks every row (QA tokenisation)."""
    for name, split in corpus.items():
        if column not in split.column_names:
            raise LmpipeError(
                f"{source} ({name}): no column '{column}'; columns are {', '.join(split.column_names)}"
            )
        feature = split.features[column]
        if _is_text(feature) or (lists_too and _is_text(getattr(feature, "feature", None))):
            continue
        if mixed_ok and (_is_mixed(feature) or (lists_too and _is_mixed(getattr(feature, "feature", None)))):
            continue
        if _is_mixed(feature):
            number, value = next((i, v) for i, v in enumerate(split[column], start=1) if not isinstance(v, str))
            where = (sources or {}).get(name, source)
            raise LmpipeError(f"{where} row {number}: column '{column}' holds {type(value).__name__}, not text")
        kind = getattr(feature, "dtype", None) or feature
        expected = "text or lists of text" if lists_too else "text"
        raise LmpipeError(f"{source} ({name}): column '{column}' holds {kind} values, not {expected}")
