"""Streaming corpora: blocks packed on the fly equal the in-memory packing, across batch and worker boundaries."""

from collections import Counter

import numpy as np
import pytest
import torch
from datasets import load_dataset

from lmpipe.cli import main
from lmpipe.config.arguments import DataArguments
from lmpipe.data import sources, streaming
from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents
from lmpipe.data.sources import load_local_file, pydoc_documents
from lmpipe.data.streaming import PackedStream, stream_documents
from lmpipe.errors import LmpipeError

BLOCK = 64


def write_corpus(path, documents) -> str:
    path.write_text("\n\n".join(documents), encoding="utf-8")
    return str(path)


def in_memory_blocks(path: str, tokenizer) -> list[list[int]]:
    return blocks_as_array(pack_blocks(tokenize_documents(load_local_file(path), tokenizer, "text"), BLOCK)).tolist()


def streamed_blocks(stream) -> list[list[int]]:
    return [row["input_ids"].tolist() for row in stream]


def test_streamed_blocks_equal_the_in_memory_packing(tmp_path, gpt2_tokenizer, monkeypatch):
    """Cut every ~100 tokens and read ~1,000 characters at a time, so remainders cross every boundary."""
    monkeypatch.setattr(streaming, "FLUSH_TOKENS", 100)
    monkeypatch.setattr(sources, "STREAMING_TEXT_CHUNK", 997)
    path = write_corpus(tmp_path / "corpus.txt", pydoc_documents()[:25])
    documents = load_local_file(path, streaming=True)
    blocks = streamed_blocks(PackedStream(documents, gpt2_tokenizer, "text", BLOCK))
    assert blocks == in_memory_blocks(path, gpt2_tokenizer)
    # independent count: each paragraph's ids plus its EOS, all concatenated; only the final partial block is lost
    paragraphs = load_local_file(path)["text"]
    total = sum(len(gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in paragraphs)
    assert len(blocks) == total // BLOCK
    flat = np.concatenate([gpt2_tokenizer(t, add_special_tokens=False)["input_ids"] + [gpt2_tokenizer.eos_token_id]
                           for t in paragraphs])
    assert np.array_equal(np.asarray(blocks).reshape(-1), flat[: len(blocks) * BLOCK])


def test_dataloader_workers_pack_disjoint_shards_that_cover_the_stream(tmp_path, gpt2_tokenizer):
    """Two files, two workers: `datasets` gives each worker one file; together they yield both files' blocks once."""
    documents = pydoc_documents()
    first = write_corpus(tmp_path / "a.txt", documents[:10])
    second = write_corpus(tmp_path / "b.txt", documents[10:20])
    stream = load_dataset("text", data_files=[first, second], split="train", streaming=True, sample_by="paragraph")
    loader = torch.utils.data.DataLoader(PackedStream(stream, gpt2_tokenizer, "text", BLOCK), batch_size=None,
                                         num_workers=2)
    seen = Counter(tuple(row["input_ids"].tolist()) for row in loader)
    expected = Counter(map(tuple, in_memory_blocks(first, gpt2_tokenizer) + in_memory_blocks(second, gpt2_tokenizer)))
    assert seen == expected


def test_validation_is_the_head_of_the_stream_and_training_skips_it(tmp_path):
    path = write_corpus(tmp_path / "corpus.txt", [f"document {i}" for i in range(12)])
    data = DataArguments(train_file=path, streaming=True, streaming_validation_documents=3)
    train, validation = stream_documents(data, path)
    assert validation["text"] == ["document 0", "document 1", "document 2"]
    assert [row["text"] for row in train] == [f"document {i}" for i in range(3, 12)]
    data.max_train_documents = 5  # the first 5 documents of the source, of which the first 3 are held out
    train, validation = stream_documents(data, path)
    assert len(validation) == 3 and [row["text"] for row in train] == ["document 3", "document 4"]


STREAMING_BAD_INPUTS = {
    "no max_steps": (["--max_steps", "-1"], "streaming: true needs max_steps > 0"),
    "everything held out": (["--streaming_validation_documents", "6"], "no training documents left"),
    "missing column": (["--text_column", "body"], "no column 'body'; columns are text"),
}


@pytest.mark.parametrize("name", STREAMING_BAD_INPUTS)
def test_bad_streaming_input_is_one_line_before_training(name, tmp_path, capsys):
    path = write_corpus(tmp_path / "corpus.txt", [f"document {i} " * 40 for i in range(6)])
    flags, message = STREAMING_BAD_INPUTS[name]
    output = tmp_path / "out"
    code = main(["pretrain", "--train_file", path, "--streaming", "true", "--max_steps", "5",
                 "--streaming_validation_documents", "2", "--output_dir", str(output), "--report_to", "none", *flags])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last_line.startswith("error: ") and message in last_line
    assert not (output / "metrics.json").exists()


DEEP_BAD_ROWS = {
    "not JSON": ('{"text": "cut off', "corpus.jsonl: line 15001 is not valid JSON (Unterminated string starting at)"),
    "not text": ('{"text": 5}', "corpus.jsonl: line 15001: column 'text' holds int, not text"),
}


@pytest.mark.parametrize("name", DEEP_BAD_ROWS)
def test_a_bad_row_deep_in_a_streamed_file_is_named_by_its_line(name, tmp_path, gpt2_tokenizer, capsys):
    """Past datasets' first chunk, whose own errors count rows from the start of a chunk."""
    bad_row, message = DEEP_BAD_ROWS[name]
    rows = [f'{{"text": "document {i} of the stream"}}' for i in range(20_000)]
    rows[15_000] = bad_row
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(LmpipeError) as error:  # where a small file's first chunk is read, or later
        train, _ = stream_documents(DataArguments(train_file=str(path), streaming=True), str(path))
        list(PackedStream(train, gpt2_tokenizer, "text", BLOCK, str(path)))
    assert str(error.value).endswith(message)
    output = tmp_path / "out"
    code = main(["pretrain", "--train_file", str(path), "--streaming", "true", "--max_steps", "2",
                 "--output_dir", str(output), "--report_to", "none"])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last_line == f"error: {path.parent / message}"
    assert not (output / "metrics.json").exists()
