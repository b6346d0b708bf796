"""`lmpipe show-data`: the first processed training examples of a recipe, with the tokens the loss is on marked.

Reads only what the examples need (data and tokenizer; no model): the rows come from the same functions training
uses (`pretrain.prepare_corpus`, `finetune.prepare_finetune_data`), so what is shown is what the Trainer gets.
Our own because no library shows a recipe's masking (axolotl's `preprocess --debug` is the model for it).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from lmpipe.config.arguments import PreferenceArguments, QAArguments
from lmpipe.config.recipe import Recipe
from lmpipe.config.rules import check_values
from lmpipe.loss.reference import IGNORE_INDEX
from lmpipe.run.files import write_text_atomically

LEARNED_COLOUR, RESET = "\033[1;32m", "\033[0m"


@dataclass
class ShowDataArguments:
    """Flags of `show-data` beyond the recipe's."""

    rows: int = field(
        default=3,
        metadata={"help": "Processed training examples (DPO: pairs, shown as two) to show and to write with --jsonl."},
    )
    jsonl: str | None = field(
        default=None,
        metadata={"help": "Also write those examples as JSON lines: input_ids, labels (-100 kept), source."},
    )
    colour: str = field(
        default="auto",
        metadata={
            "help": "Mark learned tokens in colour (a terminal) or [brackets].", "choices": ["auto", "always", "never"]
        },
    )


@dataclass
class Example:
    """One training example exactly as the Trainer's collator receives it, and where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: str


def pretraining_examples(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, Iterator[Example]]:
    """Packed blocks: the collator's labels are the inputs (the model shifts them)."""
    from lmpipe.pretrain import prepare_corpus

    data = recipe.data
    corpus = prepare_corpus(data, recipe.tokenizer, recipe.model, recipe.training)
    source = "mixture" if data.datasets else data.train_file or data.dataset_name or "data"  # blocks span documents
    blocks = (list(map(int, row["input_ids"])) for row in corpus.train)
    return corpus.tokenizer, (Example(ids, list(ids), source) for ids in blocks)


def finetuning_examples(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, Iterator[Example]]:
    """QA pairs or conversations, with their -100 labels."""
    from lmpipe.data.qa import prompt_template
    from lmpipe.finetune import prepare_finetune_data

    qa = recipe.data
    tokenizer, data = prepare_finetune_data(
        recipe, recipe.training, None if qa.messages_column else prompt_template(qa)
    )
    default_source = qa.train_file or qa.dataset_name or "data"
    sources = data.train["source"] if "source" in data.train.column_names else itertools.repeat(default_source)
    rows = data.train.select_columns(["input_ids", "labels"])
    return tokenizer, (Example(row["input_ids"], row["labels"], source) for row, source in zip(rows, sources))


def preference_examples(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, Iterator[Example]]:
    """Each pair as two examples, prompt + chosen then prompt + rejected, the answer and its end marker learned
    (what TRL's collator marks as the completion)."""
    from lmpipe.dpo import prepare_dpo_data

    data = recipe.data
    tokenizer, pairs = prepare_dpo_data(recipe, recipe.training)
    default_source = data.train_file or data.dataset_name or "data"
    sources = pairs.train["source"] if "source" in pairs.train.column_names else itertools.repeat(default_source)

    def examples() -> Iterator[Example]:
        for row, source in zip(pairs.train, sources):
            prompt = row["prompt_ids"]
            for side in ("chosen", "rejected"):
                answer = row[f"{side}_ids"]
                yield Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, f"{source} | {side}")

    return tokenizer, examples()


def marked_text(tokenizer: PreTrainedTokenizerBase, example: Example, colour: bool) -> str:
    """The example's text with each run of learned tokens marked; runs are decoded whole, so a character split
    over two tokens is shown once."""
    parts = []
    for learned, run in itertools.groupby(
        zip(example.input_ids, example.labels), key=lambda pair: pair[1] != IGNORE_INDEX
    ):
        text = tokenizer.decode([token for token, _ in run], clean_up_tokenization_spaces=False)
        if learned:
            text = f"{LEARNED_COLOUR}{text}{RESET}" if colour else f"[{text}]"
        parts.append(text)
    return "".join(parts)


def write_jsonl(examples: Iterable[Example], path: str) -> None:
    """One JSON object per example, written whole then renamed (never half a file)."""
    rows = ({"input_ids": e.input_ids, "labels": e.labels, "source": e.source} for e in examples)
    write_text_atomically(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def show_data(recipe: Recipe, out=None) -> list[Example]:
    """Print the recipe's first `rows` examples with learned tokens marked; write them to `jsonl` if asked (the
    recipe's `show_data` group, `ShowDataArguments`)."""
    args: ShowDataArguments = recipe.groups["show_data"]
    check_values(args)
    out = out or sys.stdout
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the examples are the output
    try:
        pairs = isinstance(recipe.data, PreferenceArguments)
        read_examples = (
            preference_examples if pairs
            else finetuning_examples if isinstance(recipe.data, QAArguments) else pretraining_examples
        )
        tokenizer, examples = read_examples(recipe)
        shown = list(itertools.islice(examples, args.rows * (2 if pairs else 1)))
    finally:
        if bars:
            datasets.enable_progress_bars()
    colour = args.colour == "always" or (args.colour == "auto" and out.isatty())
    for number, example in enumerate(shown, start=1):
        learned = sum(label != IGNORE_INDEX for label in example.labels)
        print(
            f"--- example {number} | {example.source} | {len(example.input_ids)} tokens, {learned} learned ---",
            file=out,
        )
        print(marked_text(tokenizer, example, colour), file=out)
    if args.jsonl:
        write_jsonl(shown, args.jsonl)
        print(f"{len(shown)} examples written to {args.jsonl}", file=out)
    return shown
