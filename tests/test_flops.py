"""Model FLOP/s: nanoGPT's 6N + 12LHQT per token counted by hand, and what a run logs and writes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmpipe.cli import main
from lmpipe.training.flops import ModelFlopsMeter, device_peak_flops, flops_per_token

from conftest import tiny_run


def test_flops_per_token_is_6n_plus_12lhqt_by_hand():
    vocab, d, layers, heads, positions, context = 100, 32, 3, 4, 64, 48
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=positions))
    per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    n = vocab * d + layers * per_layer + 2 * d  # wte (tied with lm_head), blocks, ln_f; wpe left out
    assert flops_per_token(model, context) == 6 * n + 12 * layers * heads * (d // heads) * context


def test_rates_and_mfu():
    meter = ModelFlopsMeter(flops_per_token=2e9, peak_flops_per_device=1e12)
    rates = meter.rates(tokens=1000, seconds=4.0, world_size=2)
    assert rates == pytest.approx({"model_tflops": 0.5, "mfu": 25.0})
    assert "mfu" not in ModelFlopsMeter(2e9, None).rates(1000, 4.0, 1)
    assert device_peak_flops(torch.device("cpu"), True) is None


@pytest.mark.slow
def test_a_run_logs_model_tflops_and_writes_them_to_metrics(text_file, tmp_path):
    output = tmp_path / "run"
    flags = tiny_run(max_steps=6, logging_steps=2, eval_strategy="no", save_strategy="steps", save_steps=6,
                     output_dir=output)
    assert main(["pretrain", "--train_file", str(text_file), *flags]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    model = GPT2LMHeadModel.from_pretrained(output)
    assert metrics["model_flops_per_token"] == flops_per_token(model, 32)
    expected = metrics["train_tokens_per_second"] * metrics["model_flops_per_token"] / 1e12
    assert metrics["model_tflops"] == pytest.approx(expected, rel=1e-9) and "mfu" not in metrics  # CPU: no peak
    logs = json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    train_logs = [row for row in logs if "loss" in row]
    assert [row["step"] for row in train_logs] == [2, 4, 6]
    assert "model_tflops" not in train_logs[0]  # the first log starts the clock
    assert all(row["model_tflops"] > 0 for row in train_logs[1:])
