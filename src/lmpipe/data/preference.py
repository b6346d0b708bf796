"""Preference pairs for DPO: a prompt, a chosen and a rejected answer, as text or as conversations.

Rows are what TRL's `DPOTrainer` collates: `prompt_ids`, `chosen_ids`, `rejected_ids`; its collator concatenates
prompt + answer and marks the answer by position, so padding with EOS never hides an answer's own EOS. The prompt
and each answer are tokenised apart (the QA and chat rules), so both answers follow exactly the same prompt ids
and the boundary is exact by construction. Our own because TRL tokenises prompt + answer joined and takes the
common prefix with the prompt alone, which moves the boundary whenever tokens merge across it.

Text pairs: prompt ids, then answer ids + EOS. Conversation pairs (`prompt` a list of turns, each answer one
assistant turn): the prompt's turns and the assistant header (what `generate --chat` continues), then the answer's
content ids + the assistant end marker. A prompt too long for `max_length` loses tokens from its left (text) or whole
turns (conversations, keeping a leading system turn, starting at a user turn); a pair whose longer answer leaves no
room for a prompt is dropped and counted, and more than `max_dropped_share` dropped stops the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from lmpipe.config.arguments import PreferenceArguments
from lmpipe.data.chat import ChatFormat, check_conversation, render
from lmpipe.data.fingerprint import map_tokenized
from lmpipe.data.mixture import load_source, parse_sources, realised_shares, weighted_indices
from lmpipe.data.qa import QACounts, checked_text
from lmpipe.data.sources import load_corpus, split_validation
from lmpipe.errors import LmpipeError
from lmpipe.model.tokenizer import plain_text_ids

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
PREFERENCE_COLUMN_KEYS = ("prompt_column", "chosen_column", "rejected_column")


@dataclass
class PreferenceData:
    """Tokenised train/validation pairs, per-file counts, and a mixture's realised shares."""

    train: Dataset
    validation: Dataset
    counts: dict[str, QACounts]
    mixture: dict[str, dict[str, float]] | None = None


def columns_of(args: PreferenceArguments) -> tuple[str, str, str]:
    return args.prompt_column, args.chosen_column, args.rejected_column


def is_conversation(corpus: DatasetDict, args: PreferenceArguments, source: str) -> bool:
    """Text pairs or conversation pairs, from the prompt column's type; every column present in every split."""
    kinds = set()
    for name, split in corpus.items():
        for column in columns_of(args):
            if column not in split.column_names:
                columns = ", ".join(split.column_names)
                raise LmpipeError(f"{source} ({name}): no column '{column}'; columns are {columns}")
        feature = split.features[args.prompt_column]
        kinds.add(not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")))
    if len(kinds) > 1:
        raise LmpipeError(f"{source}: the splits mix text and conversation prompts")
    return kinds.pop()


def _answer_turn(value, column: str, row: str) -> str:
    """A conversation pair's answer: exactly one assistant turn; its content."""
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)):
        raise LmpipeError(f"{row}: column '{column}' must be one assistant turn [{{role, content}}]")
    turn = value[0]
    if turn.get("role") != "assistant" or not isinstance(turn.get("content"), str):
        raise LmpipeError(f"{row}: column '{column}' must be one assistant turn with text content")
    return turn["content"]


def fit_prompt(pieces: list[list[int]], starts: list[int], first: int, room: int) -> tuple[list[int], bool] | None:
    """The prompt ids that fit `room`: all pieces, else the longest suffix from one of `starts` (pieces before
    `first` always kept); a single text piece is cut by tokens. None when nothing fits."""
    whole = [i for piece in pieces for i in piece]
    if len(whole) <= room:
        return whole, False
    if len(pieces) == 1:
        return whole[-room:], True
    for start in starts:
        kept = [i for piece in pieces[:first] + pieces[start:] for i in piece]
        if len(kept) <= room:
            return kept, True
    return None


def tokenize_pairs(
    split: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    args: PreferenceArguments,
    chat: ChatFormat | None,
    source: str,
) -> tuple[Dataset, QACounts]:
    """Rows of `prompt_ids`, `chosen_ids`, `rejected_ids` (answers end with their end marker); kept / truncated /
    dropped counts. Bad rows raise an error naming the row (1-based)."""
    prompt_column, chosen_column, rejected_column = columns_of(args)
    eos = tokenizer.eos_token_id

    def encode(batch, indices):
        rows = [f"{source} row {index + 1}" for index in indices]
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "truncated": []}
        if chat is None:
            prompts = [checked_text(p, prompt_column, row) for p, row in zip(batch[prompt_column], rows)]
            chosen = [checked_text(a, chosen_column, row) for a, row in zip(batch[chosen_column], rows)]
            rejected = [checked_text(a, rejected_column, row) for a, row in zip(batch[rejected_column], rows)]
            prompt_pieces = [[ids] for ids in plain_text_ids(tokenizer, prompts)]
            starts = [[] for _ in rows]
            chosen_ids = [ids + [eos] for ids in plain_text_ids(tokenizer, chosen)]
            rejected_ids = [ids + [eos] for ids in plain_text_ids(tokenizer, rejected)]
        else:
            prompt_pieces, starts, chosen_ids, rejected_ids = [], [], [], []
            for row, prompt, chosen, rejected in zip(
                rows, batch[prompt_column], batch[chosen_column], batch[rejected_column]
            ):
                pieces, start, answers = conversation_pair(
                    tokenizer, chat, prompt, {chosen_column: chosen, rejected_column: rejected}, prompt_column, row
                )
                prompt_pieces.append(pieces)
                starts.append(start)
                chosen_ids.append(answers[0])
                rejected_ids.append(answers[1])
        for pieces, start, good, bad in zip(prompt_pieces, starts, chosen_ids, rejected_ids):
            fitted = fit_prompt(pieces, start, start[0] if start else 0, args.max_length - max(len(good), len(bad)))
            if fitted is None or not fitted[0]:
                continue
            for key, value in zip(out, (fitted[0], good, bad, fitted[1])):
                out[key].append(value)
        return out

    encoded = map_tokenized(
        split, encode, tokenizer, args.preprocessing_num_workers, "Tokenising preference pairs", __file__,
        chat, repr(args),
    )
    dropped = len(split) - len(encoded)
    if dropped > args.max_dropped_share * len(split) or len(encoded) == 0:
        raise LmpipeError(
            f"{source}: {dropped} of {len(split)} pairs ({dropped / len(split):.1%}) leave no room for the prompt "
            f"within max_length={args.max_length} (max_dropped_share={args.max_dropped_share}); raise max_length"
        )
    truncated = sum(encoded["truncated"])
    counts = QACounts(kept=len(encoded) - truncated, truncated=truncated, dropped=dropped)
    return encoded.remove_columns("truncated"), counts


def conversation_pair(
    tokenizer: PreTrainedTokenizerBase, chat: ChatFormat, prompt, answers: dict, prompt_column: str, row: str
) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """A conversation pair's prompt ids turn by turn (the last piece the assistant header), the turns a cut prompt
    may start at, and each answer's content ids + end marker. The template must render turn by turn."""
    if not isinstance(prompt, list) or not prompt:
        raise LmpipeError(f"{row}: column '{prompt_column}' must be a non-empty list of turns")
    contents = {column: _answer_turn(value, column, row) for column, value in answers.items()}
    turns = check_conversation(
        [*prompt, {"role": "assistant", "content": next(iter(contents.values()))}], prompt_column, row, chat
    )[:-1]
    messages = [{"role": role, "content": content} for role, content in turns]
    expected = "".join(chat.turn_text(role, content) for role, content in turns)
    (rendered,) = render(tokenizer, chat.template, [messages], add_generation_prompt=True)
    if rendered != expected + chat.texts["assistant"][0]:
        raise LmpipeError(
            f"{row}: the chat template does not render this prompt as its turns then the assistant header; "
            "lmpipe scores answers by position and needs such a template"
        )
    ids = plain_text_ids(tokenizer, [content for _, content in turns] + list(contents.values()))
    pieces = [chat.headers[role] + ids[i] + chat.ends[role] for i, (role, _) in enumerate(turns)]
    pieces.append(chat.headers["assistant"])
    roles = [role for role, _ in turns]
    first = 1 if roles[0] == "system" else 0
    starts = [first] + [i for i in range(first + 1, len(roles)) if roles[i] == "user"]
    end = chat.ends["assistant"]
    return pieces, starts, [answer + end for answer in ids[len(turns):]]


def prepare_preference_data(
    args: PreferenceArguments,
    tokenizer: PreTrainedTokenizerBase,
    chat_format: Callable[[], ChatFormat],
    seed: int,
) -> PreferenceData:
    """Load, check and tokenise every file (errors name its rows), hold out validation, weight a mixture.

    `chat_format` gives the run's ChatFormat; it is asked only when a source holds conversation pairs."""
    if not args.datasets:
        source = args.train_file or args.dataset_name or "data"
        corpus = load_corpus(args.dataset_name, args.dataset_config_name, args.train_file, args.validation_file)
        chat = chat_format() if is_conversation(corpus, args, source) else None
        encoded, counts = {}, {}
        for name, split in corpus.items():
            split_source = args.validation_file if name == "validation" and args.validation_file else source
            encoded[name], counts[name] = tokenize_pairs(split, tokenizer, args, chat, split_source)
        splits = split_validation(DatasetDict(encoded), args.validation_split_percentage, source)
        return PreferenceData(splits["train"], splits["validation"], counts)
    sources = parse_sources(args.datasets, PREFERENCE_COLUMN_KEYS)
    trains, validations, counts = [], [], {}
    for index, mixture_source in enumerate(sources):
        source_args = dataclasses.replace(args, **mixture_source.columns)
        split = DatasetDict({"train": load_source(mixture_source)})
        chat = chat_format() if is_conversation(split, source_args, mixture_source.name) else None
        rows, counts[mixture_source.name] = tokenize_pairs(
            split["train"], tokenizer, source_args, chat, mixture_source.name
        )
        rows = rows.add_column("source", [mixture_source.name] * len(rows))
        held = split_validation(DatasetDict({"train": rows}), args.validation_split_percentage, mixture_source.name)
        trains.append(held["train"].select(weighted_indices(len(held["train"]), mixture_source.weight, seed + index)))
        validations.append(held["validation"])
    train = concatenate_datasets(trains)
    scored = [len(c) + len(r) for c, r in zip(train["chosen_ids"], train["rejected_ids"])]
    return PreferenceData(
        train, concatenate_datasets(validations), counts, realised_shares(sources, train["source"], scored)
    )
