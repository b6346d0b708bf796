"""QA rows: prompt/answer masking checked id by id in both batching modes, truncation, bad rows, packed attention."""

import dataclasses
import json
import re

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from lmpipe.config.arguments import QAArguments
from lmpipe.data.collate import padded_collator, padding_free_collator, real_token_fraction
from lmpipe.data.qa import TRAINING_COLUMNS, check_qa_columns, prompt_template, tokenize_qa
from lmpipe.data.sources import load_corpus
from lmpipe.errors import LmpipeError
from lmpipe.finetune import prepare_qa_data
from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

# A byte-level BPE with no merges: every character is one token, so every id below is known by hand.
CHARS = ["<|endoftext|>", "Q", ":", "Ċ", "A", "Ġ", "h", "i", "y", "o", "e", "n", "a", "w", "u", "s"]
EOS, Q, COLON, NEWLINE, A, SPACE, H, LETTER_I, Y, LETTER_O, E, N, LETTER_A, W = range(14)
TEMPLATE = "Q:{question}\nA:"
X = -100


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_tokenizer")
    (root / "vocab.json").write_text(json.dumps({char: i for i, char in enumerate(CHARS)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return gpt2_tokenizer_from_files(str(root / "vocab.json"), str(root / "merges.txt"))


def encode(tokenizer, questions, answers, max_length=64, **columns):
    split = Dataset.from_dict({"question": questions, "answer": answers, **columns})
    return tokenize_qa(split, tokenizer, QAArguments(max_length=max_length), TEMPLATE, "qa.jsonl")


def features(encoded):
    rows = encoded.select_columns(TRAINING_COLUMNS)
    return [rows[i] for i in range(len(rows))]


# "Q:hi\nA:" + " yo" + EOS   and   "Q:hey\nA:" + " no" + EOS (its first of two accepted answers)
PROMPT_1, ANSWER_1 = [Q, COLON, H, LETTER_I, NEWLINE, A, COLON], [SPACE, Y, LETTER_O, EOS]
PROMPT_2, ANSWER_2 = [Q, COLON, H, E, Y, NEWLINE, A, COLON], [SPACE, N, LETTER_O, EOS]


@pytest.fixture(scope="module")
def two_rows(tiny_tokenizer):
    encoded, counts = encode(tiny_tokenizer, ["hi", "hey"], [["yo"], ["no", "nay"]])
    assert (counts.kept, counts.truncated, counts.dropped) == (2, 0, 0)
    return encoded


def test_rows_concatenate_prompt_and_answer_ids_and_learn_eos(two_rows):
    assert two_rows["input_ids"] == [PROMPT_1 + ANSWER_1, PROMPT_2 + ANSWER_2]
    assert two_rows["labels"] == [[X] * 7 + ANSWER_1, [X] * 8 + ANSWER_2]
    assert two_rows["answers"] == [["yo"], ["no", "nay"]]  # trained on the first, scored against all
    assert two_rows["prompt"] == ["Q:hi\nA:", "Q:hey\nA:"]


def test_padded_batch_masks_padding_by_position_not_by_id(two_rows, tiny_tokenizer):
    batch = padded_collator(tiny_tokenizer)(features(two_rows))
    # GPT-2 pads with EOS (id 0): the padding is -100, the answer's own EOS (also id 0) is still a label.
    assert batch["input_ids"].tolist() == [PROMPT_1 + ANSWER_1 + [EOS], PROMPT_2 + ANSWER_2]
    assert batch["attention_mask"].tolist() == [[1] * 11 + [0], [1] * 12]
    assert batch["labels"].tolist() == [[X] * 7 + [SPACE, Y, LETTER_O, EOS, X], [X] * 8 + [SPACE, N, LETTER_O, EOS]]
    assert tiny_tokenizer.pad_token is None  # the collator pads with a private copy
    mask = batch["attention_mask"]
    assert real_token_fraction([11, 12], [[0, 1]], "padded") == mask.sum().item() / mask.numel() == 23 / 24


def test_real_token_fraction_from_lengths_equals_the_collated_batches(tiny_tokenizer):
    lengths, batches = [3, 7, 5, 2, 9], [[0, 1], [2, 3], [4]]
    collate = padded_collator(tiny_tokenizer)
    collated = [collate([{"input_ids": [1] * lengths[i], "labels": [1] * lengths[i]} for i in b]) for b in batches]
    real = sum(batch["attention_mask"].sum().item() for batch in collated)
    computed = sum(batch["input_ids"].numel() for batch in collated)
    assert real_token_fraction(lengths, batches, "padded") == real / computed == 26 / 33


def test_packed_batch_restarts_positions_and_has_no_padding(two_rows):
    batch = padding_free_collator()(features(two_rows))
    assert batch["input_ids"].tolist() == [PROMPT_1 + ANSWER_1 + PROMPT_2 + ANSWER_2]
    assert batch["labels"].tolist() == [[X] * 7 + ANSWER_1 + [X] * 8 + ANSWER_2]
    assert batch["position_ids"].tolist() == [list(range(11)) + list(range(12))]
    assert "attention_mask" not in batch
    assert real_token_fraction([11, 12], [[0, 1]], "packed") == 1.0


def test_long_prompt_is_cut_from_the_left_and_the_answer_kept(tiny_tokenizer):
    encoded, counts = encode(tiny_tokenizer, ["hi", "hiiiiiii", "hi"], ["yo", "no", "yoyoyoyoyo"], max_length=11)
    # row 1 fits exactly (7 + 4); row 2: 13 prompt tokens + 4 > 11, so the last 7 prompt tokens remain;
    # row 3: " yoyoyoyoyo" + EOS is 12 tokens on its own.
    assert (counts.kept, counts.truncated, counts.dropped) == (1, 1, 1)
    assert encoded["input_ids"][1] == [LETTER_I, LETTER_I, LETTER_I, LETTER_I, NEWLINE, A, COLON,
                                       SPACE, N, LETTER_O, EOS]
    assert encoded["labels"][1] == [X] * 7 + [SPACE, N, LETTER_O, EOS]
    assert encoded["prompt"][1] == "iiii\nA:"
    assert encoded["question"] == ["hi", "hiiiiiii"]


def test_answer_that_leaves_no_room_for_a_prompt_token_is_dropped(tiny_tokenizer):
    _, counts = encode(tiny_tokenizer, ["hi", "hi"], ["yo", "yoyo"], max_length=5)  # " yo"+EOS fits, " yoyo"+EOS not
    assert (counts.kept, counts.truncated, counts.dropped) == (0, 1, 1)


BAD_ROWS = {
    "empty answer": (["hi", "hey"], ["yo", "  "], "qa.jsonl row 2: answer 1 is empty"),
    "empty list": (["hi", "hey"], [["yo"], []], "qa.jsonl row 2: answer is an empty list"),
    "null answer": (["hi", "hey"], ["yo", None], "qa.jsonl row 2: answer is missing"),
    "null in list": (["hi", "hey"], [["yo"], ["no", None]], "qa.jsonl row 2: answer 2 is NoneType, not text"),
    "null question": ([None, "hey"], ["yo", "no"], "qa.jsonl row 1: column 'question' is NoneType, not text"),
    # the rule for empty content: an empty or whitespace-only question is refused like an empty answer
    "empty question": (["hi", ""], ["yo", "no"], "qa.jsonl row 2: column 'question' is empty"),
    "blank question": (["hi", " \n\t"], ["yo", "no"], "qa.jsonl row 2: column 'question' is empty"),
    "empty second answer": (["hi", "hey"], [["yo"], ["no", ""]], "qa.jsonl row 2: answer 2 is empty"),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_bad_row_is_named(name, tiny_tokenizer):
    questions, answers, message = BAD_ROWS[name]
    with pytest.raises(LmpipeError, match=f"^{message}$"):
        encode(tiny_tokenizer, questions, answers)


def test_empty_question_or_context_is_named_even_when_the_template_adds_text(tiny_tokenizer):
    """'Question: \nAnswer:' is a prompt, but its question is empty: refused, not learned as an answer to nothing."""
    split = Dataset.from_dict({"question": ["hi", ""], "answer": ["yo", "no"]})
    with pytest.raises(LmpipeError, match="^qa.jsonl row 2: column 'question' is empty$"):
        tokenize_qa(split, tiny_tokenizer, QAArguments(), "Question: {question}\nAnswer:", "qa.jsonl")
    split = Dataset.from_dict({"question": ["hi", "hey"], "passage": ["text", "  "], "answer": ["yo", "no"]})
    with pytest.raises(LmpipeError, match="^qa.jsonl row 2: column 'passage' is empty$"):
        tokenize_qa(split, tiny_tokenizer, QAArguments(context_column="passage"), "{context} {question}", "qa.jsonl")


def test_missing_or_non_text_columns_are_named():
    corpus = DatasetDict({"train": Dataset.from_dict({"question": ["hi"], "answers": [["yo"]], "n": [3]})})
    with pytest.raises(LmpipeError, match=r"qa.jsonl \(train\): no column 'answer'; columns are question, answers, n"):
        check_qa_columns(corpus, QAArguments(), "qa.jsonl")
    with pytest.raises(LmpipeError, match="column 'n' holds .*int64.* not text or lists of text"):
        check_qa_columns(corpus, QAArguments(answer_column="n"), "qa.jsonl")
    check_qa_columns(corpus, QAArguments(answer_column="answers"), "qa.jsonl")


TEMPLATES = {
    "no question": (QAArguments(prompt_template="Answer:"), "must contain {question}"),
    "unknown field": (QAArguments(prompt_template="{question} {title}"), "unknown field {title}"),
    "context without column": (QAArguments(prompt_template="{context} {question}"), "exactly when context_column"),
    "column without context": (QAArguments(prompt_template="{question}", context_column="c"), "exactly when"),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_bad_template_is_refused(name):
    qa, message = TEMPLATES[name]
    with pytest.raises(LmpipeError, match=message):
        prompt_template(qa)


def test_context_goes_into_the_default_template(tiny_tokenizer):
    qa = QAArguments(context_column="passage")
    assert prompt_template(qa).format(context="c", question="q") == "Context: c\nQuestion: q\nAnswer:"
    split = Dataset.from_dict({"question": ["hi"], "answer": ["yo"], "passage": ["wow"]})
    encoded, _ = tokenize_qa(split, tiny_tokenizer, QAArguments(context_column="passage"), "{context}{question}", "x")
    assert encoded["input_ids"][0] == [W, LETTER_O, W, H, LETTER_I] + ANSWER_1


def tiny_gpt2(attn_implementation="sdpa", use_cache=False):
    """Random weights; the cache off as `lmpipe.model.build.build_model` sets it for training."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(CHARS), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0,
                        embd_pdrop=0, attn_pdrop=0, use_cache=use_cache, bos_token_id=EOS, eos_token_id=EOS)
    config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def three_rows(tiny_tokenizer):
    encoded, _ = encode(tiny_tokenizer, ["hi", "hey", "sunny"], [["yo"], ["no"], ["a wasna"]])
    return encoded


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_example_run_alone(three_rows, attn_implementation):
    """No attention across examples: position ids restarting at 0 make transformers build a block-diagonal mask.

    Only without a KV cache: with one, transformers skips the packed-sequence check and the row attends across
    examples. That is why build_model sets `use_cache = False` for training.
    """
    batch = padding_free_collator()(features(three_rows))
    packed_inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        model = tiny_gpt2(attn_implementation)
        alone = torch.cat([model(torch.tensor([ids])).logits[0] for ids in three_rows["input_ids"]])
        packed = model(**packed_inputs).logits[0]
        with_cache = tiny_gpt2(attn_implementation, use_cache=True)(**packed_inputs).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(with_cache, alone, atol=1e-3)


def manual_answer_only_loss(model, rows) -> float:
    """Independent of the labels: run each example alone and read log p(answer token) at the known positions."""
    total, count = 0.0, 0
    for ids, prompt in zip(rows["input_ids"], rows["prompt"]):
        prompt_length = len(prompt)  # one token per character with this tokenizer
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for position in range(prompt_length, len(ids)):
            total -= log_probs[position - 1, ids[position]].item()
            count += 1
    return total / count


def test_answer_only_loss_equals_a_manual_gather_in_both_modes(three_rows, tiny_tokenizer):
    model = tiny_gpt2()
    rows = features(three_rows)
    with torch.no_grad():
        manual = manual_answer_only_loss(model, three_rows)
        padded = model(**padded_collator(tiny_tokenizer)(rows)).loss.item()
        packed = model(**padding_free_collator()(rows)).loss.item()
    assert padded == pytest.approx(manual, rel=1e-5)
    assert packed == pytest.approx(manual, rel=1e-5)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# name: (rows of a JSON Lines file, the error after its path). datasets reads a column of mixed types as `Json`,
# whose values are not the file's (the text "0" comes back as the number 0): the rows are read from the file.
MIXED = {
    "answers as text, then a list": ([{"answer": "0"}, {"answer": "yo"}, {"answer": ["no", "yo"]}],
                                     "row 3: column 'answer' holds a list where row 1 holds text"),
    "content parts in one turn": (
        [{"messages": [{"role": "user", "content": "0"}]},
         {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}],
        "row 2: column 'messages' item 1 'content' holds a list where row 1 holds text"),
}


@pytest.mark.parametrize("name", MIXED)
def test_a_column_of_mixed_types_is_named_by_its_first_row_of_another_type(name, tmp_path):
    rows, message = MIXED[name]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(LmpipeError, match=f"^{re.escape(path)} {re.escape(message)}"):
        load_corpus(None, train_file=path)


def test_kept_truncated_and_dropped_are_counted_per_split(tiny_tokenizer, tmp_path):
    """20 rows, the 3rd and the last too long for max_length: 18 kept, the last kept one held out for validation;
    each split counts the dropped rows of its own part of the file."""
    rows = [{"question": "hi", "answer": "yoyo" if i in (2, 19) else "yo"} for i in range(20)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    qa = QAArguments(train_file=path, max_length=6, validation_split_percentage=10)
    data = prepare_qa_data(qa, tiny_tokenizer, TrainingArguments(output_dir=str(tmp_path), use_cpu=True), "{question}")
    assert {name: dataclasses.astuple(counts) for name, counts in data.counts.items()} == {
        "train": (17, 0, 1), "validation": (1, 0, 1)}
    assert (len(data.train), len(data.validation)) == (17, 1) and data.validation["row"] == [18]
