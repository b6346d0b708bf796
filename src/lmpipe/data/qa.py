"""Question-answer rows for causal-LM fine-tuning: the loss is on the answer and its EOS, never on the prompt.

The prompt and the answer are tokenised apart and their ids concatenated, so the boundary is exact by
construction (no response-template search, no re-tokenisation of the joined text).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from lmpipe.config.arguments import QAArguments
from lmpipe.data.fingerprint import map_tokenized
from lmpipe.data.sources import check_text_column, split_validation
from lmpipe.errors import LmpipeError
from lmpipe.loss.reference import IGNORE_INDEX
from lmpipe.model.tokenizer import plain_text_ids

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_CONTEXT_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
TRAINING_COLUMNS = ["input_ids", "labels"]
# Beside every tokenised row: whether its prompt or first turns were cut, and its row in the file (0-based).
COUNTING_COLUMNS = ("truncated", "row")


def prompt_template(qa: QAArguments) -> str:
    """The recipe's template (or the default).

    {question} is required, {context} exactly when a context column is set."""
    template = qa.prompt_template or (DEFAULT_CONTEXT_TEMPLATE if qa.context_column else DEFAULT_TEMPLATE)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise LmpipeError(f"prompt_template: {e}") from None
    unknown = fields - {"question", "context"}
    if unknown:
        raise LmpipeError(f"prompt_template: unknown field {{{sorted(unknown)[0]}}}; use {{question}} and {{context}}")
    if "question" not in fields:
        raise LmpipeError("prompt_template: must contain {question}")
    if ("context" in fields) != bool(qa.context_column):
        raise LmpipeError("prompt_template: use {context} exactly when context_column is set")
    return template


def check_qa_columns(corpus: DatasetDict, qa: QAArguments, source: str) -> None:
    """Question (and context) columns hold text; the answer column holds text or lists of text."""
    for column in filter(None, (qa.question_column, qa.context_column)):
        check_text_column(corpus, column, source)
    check_text_column(corpus, qa.answer_column, source, lists_too=True)


def accepted_answers(value, row: str) -> list[str]:
    """The answers of one row as a non-empty list of non-empty strings; the first is the training target."""
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers:
        raise LmpipeError(f"{row}: answer is {'an empty list' if answers == [] else 'missing'}")
    for number, answer in enumerate(answers, start=1):
        if not isinstance(answer, str):
            raise LmpipeError(f"{row}: answer {number} is {type(answer).__name__}, not text")
        if not answer.strip():
            raise LmpipeError(f"{row}: answer {number} is empty")
    return answers


def checked_text(value, column: str, row: str) -> str:
    """A question, context, or a preference pair's prompt or answer: text with something besides whitespace (an
    empty one is refused, like an answer)."""
    if not isinstance(value, str):
        raise LmpipeError(f"{row}: column '{column}' is {type(value).__name__}, not text")
    if not value.strip():
        raise LmpipeError(f"{row}: column '{column}' is empty")
    return value


@dataclass
class QACounts:
    """Rows of a split: kept whole, kept with the prompt cut from the left, dropped (answer + EOS too long)."""

    kept: int
    truncated: int
    dropped: int


def counts_of(rows: Dataset, dropped: int) -> QACounts:
    truncated = sum(rows["truncated"])
    return QACounts(kept=len(rows) - truncated, truncated=truncated, dropped=dropped)


def hold_out(
    rows: Dataset, file_rows: int, percentage: float, source: str
) -> tuple[DatasetDict, dict[str, QACounts]]:
    """`split_validation` of one file's tokenised rows, and the counts of each split: its rows kept whole and
    truncated, and the rows dropped from the part of the file it was cut from (validation: the file's end)."""
    splits = split_validation(DatasetDict({"train": rows}), percentage, source)
    cut = splits["validation"]["row"][0]
    dropped = sorted(set(range(file_rows)) - set(rows["row"]))
    held_out_dropped = sum(row > cut for row in dropped)
    counts = {
        "train": counts_of(splits["train"], len(dropped) - held_out_dropped),
        "validation": counts_of(splits["validation"], held_out_dropped),
    }
    return splits, counts


def tokenize_qa(
    split: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    qa: QAArguments,
    template: str,
    source: str,
) -> tuple[Dataset, QACounts]:
    """Rows of `input_ids` = prompt ids + answer ids + EOS and `labels` = -100 on the prompt, the ids elsewhere.

    Also keeps `prompt` (the text the model saw), `question` and `answers` (all accepted) for evaluation, and
    `COUNTING_COLUMNS` for `hold_out`.
    A prompt too long for `max_length` loses tokens from its left; an answer that leaves no room for one prompt
    token is dropped. Bad rows raise an error naming the row (1-based, the N-th record of the file); an empty or
    whitespace-only question, context or answer is a bad row (the rule for empty content, docs/finetuning.md).
    """
    eos = tokenizer.eos_token_id

    def encode(batch, indices):
        rows = [f"{source} row {index + 1}" for index in indices]
        questions = [checked_text(q, qa.question_column, row) for q, row in zip(batch[qa.question_column], rows)]
        contexts = (
            [checked_text(c, qa.context_column, row) for c, row in zip(batch[qa.context_column], rows)]
            if qa.context_column
            else [None] * len(rows)
        )
        answers = [accepted_answers(a, row) for a, row in zip(batch[qa.answer_column], rows)]
        prompts = [template.format(question=q, context=c) for q, c in zip(questions, contexts)]
        prompt_ids = plain_text_ids(tokenizer, prompts)  # a quoted <|endoftext|> stays text
        answer_ids = plain_text_ids(tokenizer, [qa.answer_prefix + a[0] for a in answers])
        out = {key: [] for key in ("input_ids", "labels", "prompt", "question", "answers", *COUNTING_COLUMNS)}
        for index, prompt, prompt_tokens, answer_tokens, question, accepted in zip(
            indices, prompts, prompt_ids, answer_ids, questions, answers
        ):
            target = answer_tokens + [eos]
            room = qa.max_length - len(target)
            if room < 1:
                continue
            truncated = len(prompt_tokens) > room
            if truncated:
                prompt_tokens = prompt_tokens[-room:]
                prompt = tokenizer.decode(prompt_tokens)
            out["input_ids"].append(prompt_tokens + target)
            out["labels"].append([IGNORE_INDEX] * len(prompt_tokens) + target)
            out["prompt"].append(prompt)
            out["question"].append(question)
            out["answers"].append(accepted)
            out["truncated"].append(truncated)
            out["row"].append(index)
        return out

    encoded = map_tokenized(
        split, encode, tokenizer, qa.preprocessing_num_workers, "Tokenising QA", __file__, template, repr(qa)
    )
    if len(encoded) == 0:
        raise LmpipeError(f"{source}: no example fits max_length={qa.max_length} (all {len(split)} answers too long)")
    return encoded, counts_of(encoded, len(split) - len(encoded))
