"""Tokenizers: the real GPT-2 BPE from vocab+merges files, and a BPE trained on the corpus."""

from lmpipe.model.tokenizer import EOS_TOKEN, train_bpe_tokenizer

SENTENCE = "Are you a human or a robot?"


def test_gpt2_tokenizer_from_openai_files_gives_the_known_ids(gpt2_tokenizer):
    ids = gpt2_tokenizer(SENTENCE)["input_ids"]
    assert ids == [8491, 345, 257, 1692, 393, 257, 9379, 30]
    assert gpt2_tokenizer.decode(ids) == SENTENCE
    assert len(gpt2_tokenizer) == 50257 and gpt2_tokenizer.eos_token_id == 50256


def test_saved_gpt2_tokenizer_loads_back_identically(gpt2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    gpt2_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(SENTENCE)["input_ids"] == gpt2_tokenizer(SENTENCE)["input_ids"]


def test_trained_bpe_round_trips_any_bytes_and_has_eos():
    from lmpipe.data.sources import pydoc_documents

    tokenizer = train_bpe_tokenizer(pydoc_documents()[:20], vocab_size=600)
    assert len(tokenizer) == 600
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == EOS_TOKEN
    text = "naïve café — 東京 x = 3\n\ttab"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
