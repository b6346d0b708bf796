"""The speed-motivated defaults change nothing a user can measure but time (benchmarks/ measures the time)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmpipe.config.arguments import ModelArguments
from lmpipe.config.recipe import parse_recipe
from lmpipe.errors import LmpipeError
from lmpipe.model.build import build_model

from conftest import REPO


def gpt2_gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation as OpenAI wrote it: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def test_default_activation_is_gpt2s_gelu(gpt2_tokenizer):
    model = build_model(ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=16), gpt2_tokenizer, 16)
    assert model.config.activation_function == "gelu_pytorch_tanh"
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    torch.testing.assert_close(model.transformer.h[0].mlp.act(x), gpt2_gelu(x), rtol=1e-12, atol=1e-12)


def test_fused_gelu_model_matches_gelu_new_model(gpt2_tokenizer):
    """The same weights with GPT-2's original 6-op GELU give the same logits and loss."""
    args = ModelArguments(n_layer=2, n_embd=32, n_head=2, n_positions=16)
    torch.manual_seed(0)
    fused = build_model(args, gpt2_tokenizer, 16)
    original = build_model(ModelArguments(**{**vars(args), "activation_function": "gelu_new"}), gpt2_tokenizer, 16)
    original.load_state_dict(fused.state_dict())
    ids = torch.randint(0, len(gpt2_tokenizer), (2, 16))
    a, b = fused(input_ids=ids, labels=ids), original(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)


def test_unknown_activation_is_a_one_line_error():
    with pytest.raises(LmpipeError, match="invalid choice: 'gelux'"):
        parse_recipe(["--activation_function", "gelux"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_bf16_recipe_runs_on_cpu_with_use_cpu_flag(tmp_path):
    """gpt2-small.yaml sets bf16; on a CPU machine `--use_cpu true` must be enough (it is what the error asks for)."""
    recipe = str(REPO / "recipes" / "pretrain" / "gpt2-small.yaml")
    with pytest.raises(LmpipeError, match=r"gpt2-small.yaml: .*use_cpu"):
        parse_recipe([recipe])
    training = parse_recipe([recipe, "--use_cpu", "true", "--output_dir", str(tmp_path)]).training
    assert training.bf16 and training.use_cpu


def test_bad_recipe_value_still_names_the_file_with_flags(tmp_path):
    path = Path(tmp_path) / "recipe.yaml"
    path.write_text("n_layer: many\n", encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"recipe.yaml: argument --n_layer.*invalid int value: 'many'"):
        parse_recipe([str(path), "--learning_rate", "0.001"])
