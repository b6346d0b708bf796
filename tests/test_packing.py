"""Packing: EOS after every document, blocks over the whole concatenation, only the final tail dropped."""

import pytest
from datasets import Dataset

from lmpipe.data.collate import collate_blocks
from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents
from lmpipe.errors import LmpipeError

DOCUMENTS = ["Hello world", "A second document, a little longer than the first.", "x", "Last one."]


def test_blocks_equal_the_hand_concatenation(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    expected = []
    for text in DOCUMENTS:
        expected += gpt2_tokenizer.encode(text) + [eos]
    tokenized = tokenize_documents(Dataset.from_dict({"text": DOCUMENTS}), gpt2_tokenizer, "text")
    # one document per map batch and per Arrow record batch: packing must cross batches, where run_clm's
    # group_texts drops a tail in each
    tokenized = tokenized.map(lambda batch: batch, batched=True, batch_size=1, writer_batch_size=1)
    assert tokenized.data.column("input_ids").num_chunks == len(DOCUMENTS)
    blocks = blocks_as_array(pack_blocks(tokenized, block_size=5))
    n_blocks = len(expected) // 5
    assert blocks.shape == (n_blocks, 5)
    assert blocks.reshape(-1).tolist() == expected[: n_blocks * 5]
    assert len(expected) - blocks.size < 5  # only the final partial block is lost
    assert int((blocks == eos).sum()) == expected[: n_blocks * 5].count(eos) >= 2


def test_collated_labels_equal_inputs_including_eos(gpt2_tokenizer):
    tokenized = tokenize_documents(Dataset.from_dict({"text": DOCUMENTS}), gpt2_tokenizer, "text")
    packed = pack_blocks(tokenized, block_size=6)
    batch = collate_blocks([packed[i] for i in range(len(packed))])
    assert batch["input_ids"].dtype.is_floating_point is False
    assert batch["labels"].tolist() == batch["input_ids"].tolist()
    assert (batch["labels"] == gpt2_tokenizer.eos_token_id).any()  # EOS is learned, never masked as padding
    assert "attention_mask" not in batch


def test_corpus_shorter_than_a_block_is_an_error(gpt2_tokenizer):
    tokenized = tokenize_documents(Dataset.from_dict({"text": ["tiny"]}), gpt2_tokenizer, "text")
    with pytest.raises(LmpipeError, match="fewer than one block of block_size=64"):
        pack_blocks(tokenized, block_size=64, split="validation")
