"""Weighted mixtures of sources (recipe `datasets:`), all of one kind: documents, QA pairs or conversations.

Each source is loaded and tokenised alone (a bad row is named by its own file and row), its last
`validation_split_percentage`% held out alone, then its train rows are repeated or subsampled by its weight:
weight w over n rows gives floor(w) copies of every row plus a seeded sample, without replacement, of
round((w - floor(w)) * n) rows, i.e. round(w * n) examples. Our own rather than `datasets.interleave_datasets`:
that samples a stream by probability, so a 3:1 mixture is 3:1 only on average; here it is exact up to that rounding.
Streamed sources (`streaming: true`) do use it: `stream_mixture.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDataset, concatenate_datasets, load_dataset
from transformers import PreTrainedTokenizerBase

from lmpipe.config.arguments import QAArguments
from lmpipe.data.chat import ChatFormat, check_messages_column, tokenize_conversations
from lmpipe.data.qa import QACounts, check_qa_columns, hold_out, prompt_template, tokenize_qa
from lmpipe.data.sources import BUILDERS, check_text_column, first_line, load_local_file, split_validation
from lmpipe.errors import LmpipeError
from lmpipe.loss.reference import IGNORE_INDEX

QA_COLUMN_KEYS = ("question_column", "answer_column", "context_column", "messages_column")
DOCUMENT_COLUMN_KEYS = ("text_column",)
LOCATION_KEYS = ("path", "weight", "split", "config")


@dataclass(frozen=True)
class MixtureSource:
    """One entry of `datasets:`: where its rows are, its weight, and column names that differ from the recipe's."""

    path: str
    weight: float = 1.0
    split: str = "train"
    config: str | None = None
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path if self.split == "train" else f"{self.path}:{self.split}"


def parse_sources(values: list[Any], column_keys: tuple[str, ...] = QA_COLUMN_KEYS) -> list[MixtureSource]:
    """The recipe's `datasets:` entries (mappings, or their JSON text from the command line), checked one by one;
    `column_keys`: the column names a source may set for its task."""
    source_keys = (*LOCATION_KEYS, *column_keys)
    sources = []
    for number, value in enumerate(values, start=1):
        where = f"datasets[{number}]"
        try:
            entry = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            keys = ", ".join(LOCATION_KEYS)
            raise LmpipeError(f"{where}: a source is a mapping of {keys} and column keys, got {value!r}")
        unknown = sorted(set(entry) - set(source_keys))
        if unknown:
            raise LmpipeError(f"{where}: unknown key '{unknown[0]}'; keys are {', '.join(source_keys)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise LmpipeError(f"{where}: needs a path (a local file or a Hub dataset id)")
        weight = entry.get("weight", 1.0)
        if (
            isinstance(weight, bool) or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise LmpipeError(f"{where}: weight must be a number > 0, got {weight!r}")
        for key in ("split", "config", *column_keys):
            if key in entry and not isinstance(entry[key], str):
                raise LmpipeError(f"{where}: {key} must be text, got {entry[key]!r}")
        columns = {key: entry[key] for key in column_keys if key in entry}
        split, config = entry.get("split", "train"), entry.get("config")
        sources.append(MixtureSource(entry["path"], float(weight), split, config, columns))
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise LmpipeError(
            f"datasets: {next(n for n in names if names.count(n) > 1)} is listed twice; give it one weight"
        )
    if not sources:
        raise LmpipeError("datasets: the list is empty")
    return sources


def load_source(
    source: MixtureSource, sample_by: str = "paragraph", streaming: bool = False
) -> Dataset | IterableDataset:
    """A local file (any split expression, e.g. `train[:50%]`; `.txt` split by `sample_by`) or a Hub dataset's split;
    a lazy stream when `streaming`."""
    suffix = Path(source.path).suffix.lower()
    if suffix in BUILDERS and source.split == "train":
        return load_local_file(source.path, sample_by, streaming)
    try:
        if suffix in BUILDERS:
            if not Path(source.path).is_file():
                raise LmpipeError(f"{source.path}: data file not found")
            options = {"sample_by": sample_by} if BUILDERS[suffix] == "text" else {}
            return load_dataset(BUILDERS[suffix], data_files={"train": source.path}, split=source.split,
                                streaming=streaming, **options)
        return load_dataset(source.path, source.config, split=source.split, streaming=streaming)
    except LmpipeError:
        raise
    except Exception as e:  # offline, unknown id or split: each library raises its own type
        raise LmpipeError(f"{source.name}: cannot load ({first_line(e)})") from None


def weighted_indices(rows: int, weight: float, seed: int) -> list[int]:
    """floor(weight) passes over every row, then a seeded sample without replacement for the fraction."""
    whole, fraction = divmod(weight, 1.0)
    extra = min(rows, round(fraction * rows))
    sample = np.random.default_rng(seed).choice(rows, size=extra, replace=False) if extra else []
    return list(range(rows)) * int(whole) + sorted(int(i) for i in sample)


def realised_shares(
    sources: list[MixtureSource], row_sources: list[str], row_tokens: list[int]
) -> dict[str, dict[str, float]]:
    """Per source: its weight, examples (documents, for pretraining) and learned tokens in the train set, and their
    shares; `row_sources` and `row_tokens` name each train row's source and count its learned tokens."""
    examples = dict.fromkeys((s.name for s in sources), 0)
    tokens = dict.fromkeys(examples, 0)
    for name, count in zip(row_sources, row_tokens):
        examples[name] += 1
        tokens[name] += count
    return shares_of_counts(sources, examples, tokens)


def shares_of_counts(
    sources: list[MixtureSource], examples: dict[str, int], tokens: dict[str, int]
) -> dict[str, dict[str, float]]:
    """`realised_shares` from counts already made: examples and learned tokens per source name."""
    total_examples, total_tokens = sum(examples.values()), sum(tokens.values())
    return {
        source.name: {
            "weight": source.weight,
            "examples": examples.get(source.name, 0),
            "example_share": examples.get(source.name, 0) / total_examples if total_examples else 0.0,
            "learned_tokens": tokens.get(source.name, 0),
            "learned_token_share": tokens.get(source.name, 0) / total_tokens if total_tokens else 0.0,
        }
        for source in sources
    }


def format_shares(shares: dict[str, dict[str, float]]) -> str:
    return "mixture: " + " | ".join(
        f"{name} (weight {s['weight']:g}): {s['examples']:,} examples {s['example_share']:.1%}, "
        f"learned tokens {s['learned_token_share']:.1%}"
        for name, s in shares.items()
    )


@dataclass
class Mixture:
    """The mixed train rows (with a `source` column), the held-out rows of every source, the row counts of each
    source's two splits (`SOURCE train`, `SOURCE validation`) and the realised shares."""

    train: Dataset
    validation: Dataset
    counts: dict[str, QACounts]
    shares: dict[str, dict[str, float]]


def prepare_mixture(
    qa: QAArguments, tokenizer: PreTrainedTokenizerBase, chat: ChatFormat | None, seed: int
) -> Mixture:
    """Tokenise, hold out and weight every source; conversations when the recipe names a messages_column."""
    sources = parse_sources(qa.datasets)
    trains, validations, counts = [], [], {}
    for index, source in enumerate(sources):
        source_qa = dataclasses.replace(qa, **source.columns)
        if bool(source_qa.messages_column) != bool(qa.messages_column):
            raise LmpipeError(f"datasets[{index + 1}]: {source.name} is not the recipe's kind; a mixture is all "
                              "conversations (messages_column) or all QA pairs")
        split = DatasetDict({"train": load_source(source)})
        if chat is not None:
            check_messages_column(split, source_qa.messages_column, source.name)
            rows, _ = tokenize_conversations(split["train"], tokenizer, source_qa, chat, source.name)
        else:
            split = split.flatten()
            check_qa_columns(split, source_qa, source.name)
            template = prompt_template(source_qa)
            rows, _ = tokenize_qa(split["train"], tokenizer, source_qa, template, source.name)
        rows = rows.add_column("source", [source.name] * len(rows))
        held, held_counts = hold_out(rows, len(split["train"]), qa.validation_split_percentage, source.name)
        counts.update({f"{source.name} {name}": count for name, count in held_counts.items()})
        trains.append(held["train"].select(weighted_indices(len(held["train"]), source.weight, seed + index)))
        validations.append(held["validation"])
    train = concatenate_datasets(trains)
    return Mixture(
        train, concatenate_datasets(validations), counts,
        realised_shares(sources, train["source"], learned_per_row(train)),
    )


def learned_per_row(rows: Dataset) -> list[int]:
    """Labels other than -100 in each row, from the Arrow column (no Python loop over tokens)."""
    labels = rows.with_format("arrow")["labels"].combine_chunks()  # through any select()'s indices
    learned = np.asarray(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX))
    row_of_label = np.asarray(pc.list_parent_indices(labels))
    return np.bincount(row_of_label, weights=learned, minlength=len(rows)).astype(int).tolist()


def mixed_documents(
    values: list[Any], text_column: str, sample_by: str, validation_percentage: float, seed: int
) -> tuple[DatasetDict, list[MixtureSource]]:
    """Pretraining sources as one corpus of documents (`text_column`, `source`): each source's own last
    `validation_percentage`% held out, its train documents repeated or subsampled by its weight."""
    sources = parse_sources(values, DOCUMENT_COLUMN_KEYS)
    trains, validations = [], []
    for index, source in enumerate(sources):
        split = DatasetDict({"train": load_source(source, sample_by)})
        column = source.columns.get("text_column", text_column)
        check_text_column(split, column, source.name)
        documents = split["train"].select_columns([column]).rename_columns({column: "text"} if column != "text" else {})
        documents = documents.add_column("source", [source.name] * len(documents))
        held = split_validation(DatasetDict({"train": documents}), validation_percentage, source.name)
        trains.append(held["train"].select(weighted_indices(len(held["train"]), source.weight, seed + index)))
        validations.append(held["validation"])
    corpus = DatasetDict({"train": concatenate_datasets(trains), "validation": concatenate_datasets(validations)})
    return DatasetDict({name: split.rename_columns({"text": text_column} if text_column != "text" else {})
                        for name, split in corpus.items()}), sources
