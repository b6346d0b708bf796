"""Model: from scratch sized by the recipe, from a saved directory, and the vocab / positions checks."""

import pytest
import torch

from lmpipe.config.arguments import ModelArguments
from lmpipe.errors import LmpipeError
from lmpipe.model.build import CAUSAL_LM_LOSS, build_model

TINY = dict(n_layer=1, n_embd=16, n_head=2, n_positions=32)


def test_scratch_model_pads_vocab_and_sets_loss_type(gpt2_tokenizer):
    model = build_model(ModelArguments(**TINY), gpt2_tokenizer, block_size=32)
    assert model.config.vocab_size == 50304  # 50257 rounded up to a multiple of 64
    assert model.loss_type == CAUSAL_LM_LOSS and model.config.use_cache is False
    assert model.config.eos_token_id == 50256


def test_block_size_over_positions_is_refused(gpt2_tokenizer):
    with pytest.raises(LmpipeError, match="block_size=64 exceeds the model's n_positions=32"):
        build_model(ModelArguments(**TINY), gpt2_tokenizer, block_size=64)


def test_saved_model_loads_with_the_same_logits(gpt2_tokenizer, tmp_path):
    model = build_model(ModelArguments(**TINY), gpt2_tokenizer, block_size=32).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = build_model(ModelArguments(model_name_or_path=str(tmp_path)), gpt2_tokenizer, block_size=32).eval()
    ids = torch.tensor([gpt2_tokenizer.encode("Are you a human or a robot?")])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.loss_type == CAUSAL_LM_LOSS


def test_tokenizer_larger_than_pretrained_embeddings(gpt2_tokenizer, tmp_path):
    small = build_model(ModelArguments(**TINY, pad_vocab_to_multiple_of=1), gpt2_tokenizer, block_size=32)
    small.resize_token_embeddings(1000)
    small.save_pretrained(tmp_path)
    with pytest.raises(LmpipeError, match=r"tokenizer has 50257 tokens but the model has 1000 embedding rows"):
        build_model(ModelArguments(model_name_or_path=str(tmp_path)), gpt2_tokenizer, block_size=32)
    grown = build_model(ModelArguments(model_name_or_path=str(tmp_path), resize_embeddings=True), gpt2_tokenizer, 32)
    assert grown.get_input_embeddings().weight.shape[0] >= 50257


def test_pickle_only_directory_is_refused(gpt2_tokenizer, tmp_path):
    model = build_model(ModelArguments(**TINY), gpt2_tokenizer, block_size=32)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(LmpipeError, match="missing weights .*pytorch_model.bin is a pickle and is never loaded"):
        build_model(ModelArguments(model_name_or_path=str(tmp_path)), gpt2_tokenizer, block_size=32)
