"""A tiny pretraining run end to end, and the bad inputs that must stop it early with one line."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpipe.cli import main
from lmpipe.losses import shifted_token_nll

from conftest import REPO

TINY_RUN = [
    "--train_tokenizer", "true", "--tokenizer_vocab_size", "512", "--block_size", "64", "--n_positions", "64",
    "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--dropout", "0", "--max_steps", "160",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "7", "--learning_rate", "0.003",
    "--warmup_steps", "5", "--eval_strategy", "steps", "--eval_steps", "80", "--save_steps", "80",
    "--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "true", "--seed", "1",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from lmpipe.data.sources import pydoc_documents

    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_documents()[:40]), encoding="utf-8")
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
            ids = torch.as_tensor(block, dtype=torch.long)[None]
            nll, kept = shifted_token_nll(model(ids).logits, ids)
            total_nll += nll.sum().item()
            total_tokens += kept.sum().item()
    assert metrics["eval_tokens"] == total_tokens == len(blocks) * 63
    assert metrics["eval_loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)


def test_rerun_resumes_from_the_last_checkpoint(finished_run, capsys):
    corpus = finished_run.parent / "corpus.txt"
    args = ["pretrain", "--train_file", str(corpus), "--output_dir", str(finished_run), *TINY_RUN]
    args[args.index("--max_steps") + 1] = "170"
    assert main(args) == 0
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-160") and metrics["train_steps"] == 170


BAD_INPUTS = {
    "missing file": (["--train_file", "{tmp}/nope.txt"], "nope.txt: data file not found"),
    "empty file": (["--train_file", "{tmp}/empty.txt"], "empty.txt: data file is empty"),
    "missing column": (["--train_file", "{tmp}/rows.jsonl"], "no column 'text'; columns are body"),
    "not utf-8": (["--train_file", "{tmp}/latin1.txt"], "latin1.txt: line 2 is not UTF-8"),
    "block over positions": (["--block_size", "128", "--n_positions", "64"], "block_size=128 exceeds n_positions=64"),
    "corpus shorter than a block": (["--train_file", "{tmp}/short.txt"], "fewer than one block"),
    "zero learning rate": (["--learning_rate", "0"], "learning_rate must be > 0"),
    "unknown flag": (["--lerning_rate", "0.1"], "unknown option --lerning_rate (did you mean '--learning_rate'?)"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_no_finished_run(name, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    (tmp_path / "latin1.txt").write_bytes("fine line\ncaf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("one\n\ntwo\n\nthree\n")
    flags, message = BAD_INPUTS[name]
    output = tmp_path / "out"
    code = main(["pretrain", *[f.format(tmp=tmp_path) for f in flags], "--output_dir", str(output), "--report_to", "none"])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come before it
    assert code == 2
    assert last_line.startswith("error: ") and message in last_line
    assert not (output / "metrics.json").exists()


def test_pipeline_script_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "pretrain.py"), "--train_file", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.txt'}: data file not found"
    assert "Traceback" not in result.stderr
