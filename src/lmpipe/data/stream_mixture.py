"""Streaming mixtures (`datasets:` with `streaming: true`): every source streamed, its head held out for validation,
the train streams interleaved by weight with `datasets.interleave_datasets`.

A weight is a probability here (the weights are normalised to sum to 1): each next document is drawn from a source
with that probability, so a 3:1 mixture is 75 % / 25 % of documents on average whatever the sources' sizes (in
memory, `mixture.py`, a weight multiplies a source's rows instead). Stopping strategy `all_exhausted`: a source
that runs out starts again until every source has run out once, so the probabilities hold over the whole pass and
no source's tail is left unread (`first_exhausted` would end the pass, and restart the Trainer's next one from the
top, as soon as the smallest source ran out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, concatenate_datasets, interleave_datasets
from transformers import PreTrainedTokenizerBase

from lmpipe.config.arguments import DataArguments
from lmpipe.data.mixture import DOCUMENT_COLUMN_KEYS, MixtureSource, load_source, parse_sources, shares_of_counts
from lmpipe.data.packing import tokenize_documents
from lmpipe.data.sources import check_text_column
from lmpipe.data.streaming import ReadFile, named_read_errors
from lmpipe.errors import LmpipeError

STOPPING_STRATEGY = "all_exhausted"
# The name of the mixed stream in errors that no one source's file explains (a Hub stream failing mid-way).
MIXTURE_NAME = "datasets"


@dataclass
class StreamMixture:
    """The interleaved train documents (`text_column` and `source`), every source's held-out head in memory, and the
    local files to search when the stream fails on a bad row."""

    train: IterableDataset
    validation: Dataset
    sources: list[MixtureSource]
    files: list[ReadFile]


def stream_mixture(data: DataArguments, seed: int) -> StreamMixture:
    """Stream each source, hold out its first `streaming_validation_documents` documents (per source, so every
    source is evaluated), and interleave the rest by weight, seeded; errors name the source as `datasets[N]`."""
    sources = parse_sources(data.datasets, DOCUMENT_COLUMN_KEYS)
    held_out = data.streaming_validation_documents
    trains, validations, files = [], [], []
    for number, source in enumerate(sources, start=1):
        column = source.columns.get("text_column", data.text_column)
        files.append((f"datasets[{number}]: {source.name}", source.path, column))
        try:
            train, validation = split_source(source, column, held_out, data.sample_by)
        except LmpipeError as error:
            raise LmpipeError(f"datasets[{number}]: {error}") from None
        trains.append(as_documents(train, column, data.text_column, source.name))
        validations.append(as_documents(validation, column, data.text_column, source.name))
    total = sum(source.weight for source in sources)
    mixed = interleave_datasets(
        trains, probabilities=[source.weight / total for source in sources], seed=seed,
        stopping_strategy=STOPPING_STRATEGY,
    )
    if data.max_train_documents:
        mixed = mixed.take(data.max_train_documents)
    return StreamMixture(mixed, concatenate_datasets(validations), sources, files)


def split_source(
    source: MixtureSource, column: str, held_out: int, sample_by: str
) -> tuple[IterableDataset, Dataset]:
    """A source's stream after its first `held_out` documents, and those documents in memory; both checked."""
    stream = load_source(source, sample_by, streaming=True)
    with named_read_errors(source.name, column):
        validation = Dataset.from_list(list(stream.take(held_out)))
        first = next(iter(stream.skip(held_out).take(1)), None)
    if first is None:
        raise LmpipeError(f"{source.name}: no training documents left after holding out {held_out} for validation")
    check_text_column(DatasetDict({"validation": validation, "train": Dataset.from_list([first])}), column, source.name)
    return stream.skip(held_out), validation


def as_documents(documents: Dataset | IterableDataset, column: str, text_column: str, name: str):
    """Only the source's text, under the recipe's `text_column`, and a `source` column naming it."""
    documents = documents.select_columns([column])
    if column != text_column:
        documents = documents.rename_column(column, text_column)
    if isinstance(documents, Dataset):
        return documents.add_column("source", [name] * len(documents))
    return documents.map(lambda batch: {"source": [name] * len(batch[text_column])}, batched=True)


def read_head(
    mixture: StreamMixture, tokenizer: PreTrainedTokenizerBase, text_column: str, tokens: int
) -> tuple[list[str], np.ndarray]:
    """Source and token count (ids + EOS, as `PackedStream` packs them) of each document of the train stream, up to
    the one holding its `tokens`-th token (the whole stream when it is shorter): one tokenising pass."""
    sources, lengths, read = [], [], 0
    with named_read_errors(MIXTURE_NAME, text_column, mixture.files):
        for row in tokenize_documents(mixture.train, tokenizer, text_column, keep=("source",)):
            if read >= tokens:
                break
            sources.append(row["source"])
            lengths.append(len(row["input_ids"]))
            read += lengths[-1]
    return sources, np.asarray(lengths, dtype=np.int64)


def head_counts(sources: list[str], lengths: np.ndarray, tokens: int) -> tuple[Counter, Counter]:
    """Per source, the documents with a token among the first `tokens` tokens, and their tokens there."""
    taken = np.clip(tokens - (np.cumsum(lengths) - lengths), 0, lengths)
    documents, counted = Counter(), Counter()
    for source, take in zip(sources, taken.tolist()):
        if take:
            documents[source] += 1
            counted[source] += take
    return documents, counted


def trained_shares(
    mixture: StreamMixture, tokenizer: PreTrainedTokenizerBase, text_column: str, block_size: int, blocks: int
) -> dict[str, dict[str, float]]:
    """`realised_shares` of the first `blocks` blocks of the packed train stream (the blocks a run trained on),
    read again: the interleave is seeded, so it yields the same documents. A stream shorter than that was gone
    round again by the Trainer: its whole blocks count once per pass, then the head of the last pass."""
    trained = blocks * block_size
    sources, lengths = read_head(mixture, tokenizer, text_column, trained)
    read = int(lengths.sum())
    if read >= trained:
        return shares_of_counts(mixture.sources, *head_counts(sources, lengths, trained))
    whole = read - read % block_size  # the tail after the last whole block is never trained
    passes, rest = divmod(trained, whole)
    pass_examples, pass_tokens = head_counts(sources, lengths, whole)
    examples, tokens = head_counts(sources, lengths, rest)
    examples.update({name: passes * n for name, n in pass_examples.items()})
    tokens.update({name: passes * n for name, n in pass_tokens.items()})
    return shares_of_counts(mixture.sources, examples, tokens)
