"""A tiny pretraining run end to end (the bad inputs that must stop it early are in test_bad_inputs.py)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpipe.cli import main
from lmpipe.loss.reference import shifted_token_nll

from conftest import tiny_run, write_pydoc_corpus

pytestmark = pytest.mark.slow  # a 160-step pretraining run

TINY_RUN = tiny_run(
    tokenizer_vocab_size=512, block_size=64, n_positions=64, n_layer=2, n_embd=64, dropout=0, max_steps=160,
    per_device_train_batch_size=8, per_device_eval_batch_size=7, learning_rate=0.003, warmup_steps=5,
    eval_strategy="steps", eval_steps=80, save_steps=80, logging_steps=10, seed=1,
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    write_pydoc_corpus(corpus, 40)
    output = root / "run"
    assert main(["pretrain", "--train_file", str(corpus), "--output_dir", str(output), *TINY_RUN]) == 0
    return output


def test_run_writes_metrics_below_the_unigram_baseline(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert math.isfinite(metrics["perplexity"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity"] < 0.5 * metrics["unigram_perplexity"]
    assert 159 * 8 * 64 < metrics["train_tokens"] <= 160 * 8 * 64  # the epoch's last batch may be short
    for name in ("recipe.yaml", "loss.png", "model.safetensors", "tokenizer.json", "checkpoint-160"):
        assert (finished_run / name).exists(), name


def test_reported_perplexity_equals_a_hand_loop_over_the_saved_model(finished_run):
    """Independent computation: reload the saved model and score each validation block one at a time."""
    from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents
    from lmpipe.data.sources import load_corpus, split_validation

    metrics = json.loads((finished_run / "metrics.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(finished_run)
    model = AutoModelForCausalLM.from_pretrained(finished_run).eval()
    corpus = split_validation(load_corpus(None, train_file=str(finished_run.parent / "corpus.txt")), 10, "corpus")
    blocks = blocks_as_array(pack_blocks(tokenize_documents(corpus["validation"], tokenizer, "text"), 64))
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.tensor(block, dtype=torch.long)[None]  # a copy: the Arrow-backed array is read-only
            nll, kept = shifted_token_nll(model(ids).logits, ids)
            total_nll += nll.sum().item()
            total_tokens += kept.sum().item()
    assert metrics["eval_tokens"] == total_tokens == len(blocks) * 63
    assert metrics["eval_loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)


def test_check_loss_on_a_run_directory_checks_its_saved_model_on_its_recipe(finished_run, capsys):
    """`lmpipe check-loss RUN_DIR`: the run's recipe.yaml (task recorded) with the saved model and tokenizer."""
    assert (finished_run / "recipe.yaml").read_text().startswith("task: pretrain\n")
    assert main(["check-loss", str(finished_run), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    total = next(line.split() for line in out.splitlines() if line.split()[:1] == ["all"])
    assert int(total[1].replace(",", "")) == 2 * 8 * 63  # two batches of 8 blocks, 63 scored tokens each
    tokenizer = AutoTokenizer.from_pretrained(finished_run)
    assert float(total[2]) < math.log(len(tokenizer)) - 1  # the trained model, not a fresh one (~log V)


def test_rerun_resumes_from_the_last_checkpoint(finished_run, capsys):
    corpus = finished_run.parent / "corpus.txt"
    args = ["pretrain", "--train_file", str(corpus), "--output_dir", str(finished_run), *TINY_RUN]
    args[args.index("--max_steps") + 1] = "170"
    assert main(args) == 0
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-160") and metrics["train_steps"] == 170
