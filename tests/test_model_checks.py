"""Models load whole or not at all, in every command that loads one: a directory missing its tokenizer, config or
weights, or holding NaN weights (a real safetensors file, header intact), is one line naming the directory and
what is wrong, exit 2; a loss that overflows is never printed as a JSON number."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import lmpipe.finetune  # noqa: F401  imported before capsys: library loggers keep the stderr they first see
import lmpipe.pretrain  # noqa: F401
from lmpipe.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory, gpt2_tokenizer):
    """A whole tiny GPT-2 directory and copies of it with one thing wrong each."""
    root = tmp_path_factory.mktemp("models")
    whole = root / "whole"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=64, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(whole)
    gpt2_tokenizer.save_pretrained(whole)
    for name, remove in {"no-tokenizer": ["tokenizer.json", "tokenizer_config.json"], "no-config": ["config.json"],
                         "no-weights": ["model.safetensors"]}.items():
        shutil.copytree(whole, root / name)
        for file in remove:
            (root / name / file).unlink(missing_ok=True)
    for name, value, keys in (("nan", math.nan, ["transformer.h.0.attn.c_attn.weight"]),
                              ("overflowing", 1e30, ["transformer.wte.weight", "transformer.ln_f.weight"])):
        shutil.copytree(whole, root / name)
        weights = load_file(whole / "model.safetensors")
        for key in keys:
            weights[key] = torch.full_like(weights[key], value)
        save_file(weights, root / name / "model.safetensors", metadata={"format": "pt"})
    (root / "text.txt").write_text("\n\n".join(f"Paragraph {i} of a small but valid text to score." for i in range(60)))
    qa = root / "qa.jsonl"
    qa.write_text("".join(f'{{"question": "q {i}?", "answer": ["a {i}"]}}\n' for i in range(20)))
    return root


COMMANDS = {
    "pretrain": ["pretrain", "--model_name_or_path", "{model}", "--train_tokenizer", "false", "--train_file",
                 "{root}/text.txt", "--block_size", "32", "--output_dir", "{tmp}/out", "--report_to", "none"],
    "finetune-qa": ["finetune-qa", "--model_name_or_path", "{model}", "--train_file", "{root}/qa.jsonl",
                    "--max_length", "32", "--output_dir", "{tmp}/out", "--report_to", "none"],
    "generate": ["generate", "--model_name_or_path", "{model}", "--prompt", "Hello"],
    "perplexity": ["perplexity", "--model_name_or_path", "{model}", "--validation_file", "{root}/text.txt"],
    "check-loss": ["check-loss", "--model_name_or_path", "{model}", "--train_file", "{root}/text.txt",
                   "--block_size", "32", "--batches", "1", "--report_to", "none"],
}
FAULTS = {
    "no-tokenizer": "not a whole model directory, missing tokenizer files (tokenizer.json, or vocab.json + merges.txt)",
    "no-config": "not a whole model directory, missing config.json",
    "no-weights": "not a whole model directory, missing weights (*.safetensors)",
    "nan": "weight transformer.h.0.attn.c_attn.weight holds NaN or inf; the model cannot be used",
}


# Over 2 s each (4-8 s measured): these prepare the corpus before they load the model (check-loss no-config: 3 of
# its 4 s in `datasets` hashing the GPT-2 tokenizer for its cache fingerprint). Out of `pytest -m "not slow"`.
SLOW = {("check-loss", "no-config"), ("check-loss", "no-weights"), ("check-loss", "nan"), ("pretrain", "nan")}


@pytest.mark.parametrize("command, fault", [
    pytest.param(command, fault, id=f"{command}-{fault}", marks=[pytest.mark.slow] if (command, fault) in SLOW else [])
    for command in COMMANDS for fault in FAULTS
])
def test_a_broken_model_directory_is_one_line_in_every_command(command, fault, models, tmp_path, capsys):
    model = models / fault
    argv = [arg.format(model=model, root=models, tmp=tmp_path) for arg in COMMANDS[command]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == f"error: {model}: {FAULTS[fault]}"
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_a_loss_that_overflows_is_an_error_not_a_nan_in_json(models, capsys):
    model = models / "overflowing"  # finite weights whose logits overflow float32
    assert main(["perplexity", "--model_name_or_path", str(model), "--validation_file", str(models / "text.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == (
        f"error: {model}: eval_loss, perplexity, bits_per_byte, word_perplexity, byte_perplexity"
        f" on {models / 'text.txt'} is not finite (NaN or inf)"
    )


def test_the_whole_directory_loads(models, capsys):
    """The same commands on the intact directory work: the checks refuse only what is broken."""
    assert main(["generate", "--model_name_or_path", str(models / "whole"), "--prompt", "Hello",
                 "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
