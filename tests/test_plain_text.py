"""Text is text: a literal `<|endoftext|>` inside a document, question or answer is tokenised as plain text, never
as the control token, and bits per byte count its 13 bytes."""

from datasets import Dataset

from lmpipe.config.arguments import QAArguments
from lmpipe.data.packing import tokenize_documents
from lmpipe.data.qa import tokenize_qa
from lmpipe.training.exact_eval import token_byte_lengths

QUOTING = "GPT-2 ends documents with <|endoftext|> (13 bytes), e.g. 'a<|endoftext|>b'."


def test_a_document_quoting_eos_has_one_eos_and_every_byte_counted(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    ids = tokenize_documents(Dataset.from_dict({"text": [QUOTING, "next"]}), gpt2_tokenizer, "text")["input_ids"]
    assert [row.count(eos) for row in ids] == [1, 1] and ids[0][-1] == eos
    assert ids[0][:-1] == gpt2_tokenizer(QUOTING, split_special_tokens=True)["input_ids"]
    assert gpt2_tokenizer.decode(ids[0][:-1]) == QUOTING
    byte_lengths = token_byte_lengths(gpt2_tokenizer)
    assert sum(byte_lengths[token] for token in ids[0]) == len(QUOTING.encode("utf-8"))  # EOS itself: 0 bytes
    # what the tokenizer does by default, and what this guards against: two control tokens and 26 bytes lost
    assert gpt2_tokenizer(QUOTING)["input_ids"].count(eos) == 2


def test_a_question_or_answer_quoting_eos_is_text(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    split = Dataset.from_dict({"question": ["what follows <|endoftext|>?"],
                               "answer": [["a new <|endoftext|> document"]]})
    rows, _ = tokenize_qa(split, gpt2_tokenizer, QAArguments(), "Question: {question}\nAnswer:", "qa.jsonl")
    assert rows[0]["input_ids"].count(eos) == 1 and rows[0]["input_ids"][-1] == eos
    answer = gpt2_tokenizer(" a new <|endoftext|> document", split_special_tokens=True)["input_ids"] + [eos]
    assert [label for label in rows[0]["labels"] if label != -100] == answer
