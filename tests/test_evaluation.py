"""Exact perplexity: pipelines/perplexity.py against hand loops, the guide's sliding window, and the Trainer's evaluation."""

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
from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents
from lmpipe.data.sources import load_local_file
from lmpipe.evaluation import EvaluateArguments, evaluate_file
from lmpipe.losses import manual_causal_lm_loss
from lmpipe.model import CAUSAL_LM_LOSS
from lmpipe.train import build_trainer

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
        "--output_dir", str(root / "run"), "--train_tokenizer", "true", "--tokenizer_vocab_size", "512",
        "--block_size", str(BLOCK), "--n_positions", str(BLOCK), "--n_layer", "1", "--n_embd", "64", "--n_head", "2",
        "--dropout", "0", "--max_steps", "400", "--per_device_train_batch_size", "16", "--learning_rate", "0.003",
        "--warmup_steps", "10", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "1",
    ]
    assert main(["pretrain", *flags]) == 0
    return root


def evaluate(trained, **flags) -> dict:
    args = EvaluateArguments(str(trained / "run"), str(trained / "valid.txt"), block_size=BLOCK, batch_size=16, **flags)
    return evaluate_file(args)


def validation_tokens(trained) -> tuple[torch.nn.Module, object, torch.Tensor]:
    """The saved model, its tokenizer, and the validation text as whole blocks (the span both methods score)."""
    tokenizer = AutoTokenizer.from_pretrained(trained / "run")
    model = AutoModelForCausalLM.from_pretrained(trained / "run").eval()
    documents = load_local_file(str(trained / "valid.txt"))
    blocks = blocks_as_array(pack_blocks(tokenize_documents(documents, tokenizer, "text"), BLOCK))
    return model, tokenizer, torch.tensor(blocks.reshape(-1), dtype=torch.long)


def summed_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """F.cross_entropy summed over one window, shifted by hand: independent of losses.shifted_token_nll."""
    with torch.no_grad():
        logits = model(input_ids[None]).logits[0]
    nll = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
    return nll, int((labels[1:] != -100).sum())


@pytest.mark.parametrize("stride", [None, BLOCK])
def test_non_overlapping_equals_a_hand_loop_and_the_runs_own_evaluation(trained, stride):
    model, tokenizer, ids = validation_tokens(trained)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for block in ids.view(-1, BLOCK):
        nll, tokens = summed_nll(model, block, block)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        total_bytes += len(tokenizer.decode(block[1:], skip_special_tokens=True).encode("utf-8"))
    result = evaluate(trained, stride=stride)
    assert result["stride"] == BLOCK and result["block_size"] == BLOCK
    assert result["eval_tokens"] == total_tokens == len(ids) // BLOCK * (BLOCK - 1)
    assert result["eval_loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-5)
    run_metrics = json.loads((trained / "run" / "metrics.json").read_text())  # the Trainer scored the same blocks
    assert result["eval_tokens"] == run_metrics["eval_tokens"]
    assert result["eval_loss"] == pytest.approx(run_metrics["eval_loss"], rel=1e-5)


def test_sliding_window_equals_the_perplexity_guides_loop(trained):
    """The loop of the transformers perplexity guide, one window at a time; each token after the first scored once."""
    stride = 11
    model, _, ids = validation_tokens(trained)
    assert (len(ids) - BLOCK) % stride  # the last window is a shorter one
    total_nll, total_tokens, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + BLOCK, len(ids))
        target_length = end - previous_end
        input_ids = ids[begin:end]
        labels = input_ids.clone()
        labels[:-target_length] = -100
        nll, tokens = summed_nll(model, input_ids, labels)
        total_nll, total_tokens, previous_end = total_nll + nll, total_tokens + tokens, end
        if end == len(ids):
            break
    result = evaluate(trained, stride=stride)
    n_blocks = len(ids) // BLOCK
    # every token of the span but the first; the non-overlapping method cannot score each block's first token
    assert result["eval_tokens"] == total_tokens == len(ids) - 1 == n_blocks * (BLOCK - 1) + n_blocks - 1
    assert result["eval_loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)


def test_chunked_loss_and_full_logits_give_the_same_perplexity(trained):
    chunked, full = evaluate(trained, stride=11), evaluate(trained, stride=11, chunked_loss=False)
    assert chunked["eval_tokens"] == full["eval_tokens"]
    for key in ("eval_loss", "perplexity", "bits_per_byte"):
        assert chunked[key] == pytest.approx(full[key], rel=1e-6)


def test_a_smaller_stride_never_gives_a_higher_perplexity(trained):
    """More context per scored token: 30.7 > 28.2 > 27.7 here; below stride 8 the gain (<0.5%) is too small to pin."""
    perplexities = [evaluate(trained, stride=stride)["perplexity"] for stride in (BLOCK, 16, 8)]
    assert perplexities == sorted(perplexities, reverse=True)


def test_cli_prints_one_json_line(trained, capsys):
    flags = ["--model_name_or_path", str(trained / "run"), "--validation_file", str(trained / "valid.txt")]
    assert main(["perplexity", *flags, "--block_size", str(BLOCK), "--stride", "16", "--batch_size", "16"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(evaluate(trained, stride=16))


BAD_FLAGS = {
    "zero stride": (["--stride", "0"], "stride must be >= 1, got 0"),  # lmpipe.recipe_checks, before any data
    "stride over the block": (["--block_size", "16", "--stride", "17"], "stride=17 must be between 1 and block_size=16"),
    "block over positions": (["--block_size", "64"], "block_size=64 must be between 2 and the model's n_positions=32"),
}


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
