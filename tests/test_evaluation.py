"""Exact perplexity: pipelines/perplexity.py's rolling windows against a hand loop, and the Trainer's evaluation."""

import json
import math
import random
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainingArguments

from lmpipe.cli import main
from lmpipe.data.sources import load_local_file
from lmpipe.loss.reference import manual_causal_lm_loss
from lmpipe.model.build import CAUSAL_LM_LOSS
from lmpipe.training.trainer import build_trainer
from lmpipe.zero_shot.perplexity import EvaluateArguments, evaluate_file

from conftest import tiny_run

BLOCK = 32


def documents_with_own_vocabularies(n_documents: int, seed: int) -> list[str]:
    """Each document repeats 8 words drawn from 200: the more context a model sees, the better it predicts."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(400)})[:200]
    rng = random.Random(seed)
    return [" ".join(rng.choices(rng.sample(words, 8), k=100)) for _ in range(n_documents)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 pretrained by lmpipe until it uses its context, and the run's own evaluation of valid.txt."""
    root = tmp_path_factory.mktemp("evaluation")
    (root / "train.txt").write_text("\n\n".join(documents_with_own_vocabularies(800, seed=1)), encoding="utf-8")
    (root / "valid.txt").write_text("\n\n".join(documents_with_own_vocabularies(20, seed=2)), encoding="utf-8")
    flags = [
        "--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt"),
        "--output_dir", str(root / "run"),
        *tiny_run(
            tokenizer_vocab_size=512, block_size=BLOCK, n_positions=BLOCK, n_embd=64, dropout=0, max_steps=400,
            per_device_train_batch_size=16, learning_rate=0.003, warmup_steps=10, eval_strategy="no",
            save_strategy="no", seed=1,
        ),
    ]
    assert main(["pretrain", *flags]) == 0
    return root


def evaluate(trained, **flags) -> dict:
    args = EvaluateArguments(str(trained / "run"), str(trained / "valid.txt"), block_size=BLOCK, batch_size=16, **flags)
    return evaluate_file(args)


def rolling_by_hand(trained, stride: int) -> tuple[float, int, int, int]:
    """Each document alone after EOS: targets 1..B, then stride-long spans, each window the B tokens before its last
    target (the harness's rolling windows, written as a loop over target spans). (NLL, tokens, words, bytes)."""
    tokenizer = AutoTokenizer.from_pretrained(trained / "run")
    model = AutoModelForCausalLM.from_pretrained(trained / "run").eval()
    total_nll, total_tokens, total_words, total_bytes = 0.0, 0, 0, 0
    for text in load_local_file(str(trained / "valid.txt"))["text"]:
        ids = torch.tensor([tokenizer.eos_token_id, *tokenizer.encode(text)])
        n = len(ids) - 1
        spans = [(1, min(BLOCK, n))] + [(a, min(a + stride - 1, n)) for a in range(BLOCK + 1, n + 1, stride)]
        for first, last in spans:
            window = ids[max(0, last - BLOCK) : last + 1]
            with torch.no_grad():
                logits = model(window[None, :-1]).logits[0]
            scored = last - first + 1
            total_nll += F.cross_entropy(logits[-scored:], window[-scored:], reduction="sum").item()
            total_tokens += scored
        total_words += len(text.split())  # no leading/trailing whitespace in these documents
        total_bytes += len(text.encode("utf-8"))
    return total_nll, total_tokens, total_words, total_bytes


@pytest.mark.slow
@pytest.mark.parametrize("stride", [None, 11])
def test_rolling_perplexity_equals_a_hand_loop_over_every_document(trained, stride):
    nll, tokens, words, n_bytes = rolling_by_hand(trained, stride or BLOCK)
    result = evaluate(trained, stride=stride)
    n_documents = len(load_local_file(str(trained / "valid.txt")))
    assert result["stride"] == (stride or BLOCK) and result["block_size"] == BLOCK
    assert result["eval_tokens"] == tokens  # every token of every document once; no EOS scored, no tail dropped
    assert tokens == sum(len(AutoTokenizer.from_pretrained(trained / "run").encode(t))
                         for t in load_local_file(str(trained / "valid.txt"))["text"]) and n_documents == 20
    assert result["eval_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


@pytest.mark.slow
def test_a_smaller_stride_never_gives_a_higher_perplexity(trained):
    """More context per scored token gives a lower perplexity here."""
    perplexities = [evaluate(trained, stride=stride)["perplexity"] for stride in (BLOCK, 16, 8)]
    assert perplexities == sorted(perplexities, reverse=True)


@pytest.mark.slow
def test_cli_prints_one_json_line(trained, capsys):
    flags = ["--model_name_or_path", str(trained / "run"), "--validation_file", str(trained / "valid.txt")]
    assert main(["perplexity", *flags, "--block_size", str(BLOCK), "--stride", "16", "--batch_size", "16"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(evaluate(trained, stride=16))


BAD_FLAGS = {
    "zero stride": (["--stride", "0"], "stride must be >= 1, got 0"),  # lmpipe.config.rules, before any data
    "stride over the block": (["--block_size", "16", "--stride", "17"],
                              "stride=17 must be between 1 and block_size=16"),
    "block over positions": (["--block_size", "64"], "block_size=64 must be between 2 and the model's n_positions=32"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_window_is_a_one_line_error(trained, name, capsys):
    flags, message = BAD_FLAGS[name]
    files = ["--model_name_or_path", str(trained / "run"), "--validation_file", str(trained / "valid.txt")]
    assert main(["perplexity", *files, *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"


def test_a_model_is_required(capsys):
    assert main(["perplexity", "--validation_file", "x.txt"]) == 2
    assert capsys.readouterr().err.strip() == "error: --model_name_or_path is required"


def test_trainer_evaluation_is_the_token_mean_over_uneven_rows_and_batches(tmp_path):
    """7 rows in eval batches of 3 (the last one short), scoring 2 to 11 tokens per row: each row counted once."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=12, n_embd=16, n_layer=1, n_head=2)).eval()
    model.loss_type = CAUSAL_LM_LOSS
    input_ids = torch.randint(0, 50, (7, 12), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    for row, masked in enumerate([9, 0, 0, 5, 1, 9, 3]):
        labels[row, :masked] = -100
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
    collate = lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}  # noqa: E731
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    trainer = build_trainer(model, args, dataset, dataset, collate, None, np.ones(50, dtype=np.int64))
    metrics = trainer.evaluate()
    with torch.no_grad():
        token_mean = manual_causal_lm_loss(model(input_ids).logits, labels).item()
    assert metrics["eval_tokens"] == int((labels[:, 1:] != -100).sum())
    assert metrics["eval_loss"] == pytest.approx(token_mean, rel=1e-5)
    assert abs(metrics["eval_batch_mean_loss"] - token_mean) > 1e-3  # the Trainer's own number is biased here
