"""The bad-input battery: every mistake in a recipe, a data file, a flag, a model or an output directory stops
the run before compute with one line `error: <file/row/key>: <what is wrong>`, exit code 2, and leaves the
output directory exactly as it was (never a finished-looking run)."""

import json
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lmpipe.finetune  # noqa: F401  imported here, before capsys: library loggers keep the stderr they first see
import lmpipe.pretrain  # noqa: F401
from lmpipe.cli import main

from conftest import REPO


def tiny_gpt2(directory, vocab_size, tokenizer=None):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def complete_looking_checkpoint(directory, weights: bytes):
    """Every file a checkpoint needs, all intact except `model.safetensors`."""
    directory.mkdir(parents=True)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    (directory / "model.safetensors").write_bytes(weights)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, directory / name)


@pytest.fixture(scope="module")
def root(tmp_path_factory, gpt2_tokenizer):
    """Every bad file the battery points at."""
    root = tmp_path_factory.mktemp("bad")
    recipes = {
        "unknown_key.yaml": "learning_rat: 0.1\n",
        "wrong_type.yaml": "n_layer: two\n",
        "broken.yaml": "n_layer: 2\nlearning_rate: [0.1\n",
        "list.yaml": "- n_layer\n- 2\n",
        "token.yaml": "hub_token: hf_secret\n",
        "negative_batch.yaml": "per_device_train_batch_size: -8\n",
    }
    for name, text in recipes.items():
        (root / name).write_text(text)
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("fine line\ncaf\xe9 au lait\n".encode("latin-1"))
    (root / "short.txt").write_text("one\n\ntwo\n\nthree\n")
    (root / "corpus.txt").write_text("\n\n".join(f"Paragraph {i} of a small but valid corpus." for i in range(40)))
    (root / "notes.docx").write_text("not a corpus format")
    (root / "rows.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    (root / "numbers.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    (root / "mixed_text.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": 12345}\n{"text": "four"}\n')
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no closing quote}\n{"text": "fine"}\n')
    qa = {
        "no_question.jsonl": [{"query": "q", "answer": ["a"]}],
        "int_answer.jsonl": [{"question": "q one", "answer": ["a"]}, {"question": "q two", "answer": [7]}],
        "long_answers.jsonl": [{"question": f"q {i}", "answer": ["word " * 80]} for i in range(4)],
    }
    for name, rows in qa.items():
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    tiny_gpt2(root / "gpt2-tiny", len(gpt2_tokenizer), gpt2_tokenizer)
    tiny_gpt2(root / "gpt2-64-rows", 64)
    tiny_gpt2(root / "gpt2-torn", 64, gpt2_tokenizer)
    weights = (root / "gpt2-torn" / "model.safetensors").read_bytes()
    (root / "gpt2-torn" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    pickled = tiny_gpt2(root / "gpt2-pickle", len(gpt2_tokenizer), gpt2_tokenizer)
    torch.save(GPT2LMHeadModel.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    complete_looking_checkpoint(root / "run" / "checkpoint-3", weights[:100])
    return root


QA = ["finetune-qa", "--model_name_or_path", "{root}/gpt2-tiny", "--max_length", "32"]
PRETRAIN = ["pretrain"]  # the default recipe: every error below comes before its corpus is tokenised
SMALL_GIVEN_TOKENIZER = ["pretrain", "--train_file", "{root}/corpus.txt", "--block_size", "32"]
SMALL = [*SMALL_GIVEN_TOKENIZER, "--tokenizer_vocab_size", "300"]

# name: (command line, text the last stderr line must contain: it names the file, row, key or flag)
# A column of mixed types: datasets with the `Json` feature (2026) reads it and lmpipe names the row from the file;
# older releases (the lower bound, 4.0) fail to read the file. Either way one line naming the file.
MIXED_ANSWERS = (
    "int_answer.jsonl row 2: column 'answer' item 1 holds a number where row 1 holds text" if hasattr(datasets, "Json")
    else "int_answer.jsonl: cannot parse as json"
)
MIXED_TEXT = (
    "mixed_text.jsonl row 3: column 'text' holds a number where row 1 holds text" if hasattr(datasets, "Json")
    else "mixed_text.jsonl: cannot parse as json"
)
BAD_INPUTS = {
    # recipes
    "unknown recipe key": (["pretrain", "{root}/unknown_key.yaml"],
                           "unknown_key.yaml: unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    "wrong type for a key": (["pretrain", "{root}/wrong_type.yaml"], "wrong_type.yaml: argument --n_layer"),
    "yaml that does not parse": (["pretrain", "{root}/broken.yaml"], "broken.yaml: line 3 is not valid YAML"),
    "recipe that is not a mapping": (["pretrain", "{root}/list.yaml"], "list.yaml: a recipe is a flat mapping"),
    "missing recipe file": (["pretrain", "{root}/nope.yaml"], "nope.yaml: recipe file not found"),
    "hub token in a recipe": (["pretrain", "{root}/token.yaml"], "token.yaml: 'hub_token' may not be set in a recipe"),
    "negative batch size in a recipe": (["pretrain", "{root}/negative_batch.yaml"],
                                        "per_device_train_batch_size must be >= 1, got -8"),
    # data files
    "missing data file": ([*PRETRAIN, "--train_file", "{root}/nope.txt"], "nope.txt: data file not found"),
    "empty data file": ([*PRETRAIN, "--train_file", "{root}/empty.txt"], "empty.txt: data file is empty"),
    "non-utf-8 text": ([*PRETRAIN, "--train_file", "{root}/latin1.txt"], "latin1.txt: line 2 is not UTF-8"),
    "jsonl with a broken line": ([*PRETRAIN, "--train_file", "{root}/broken.jsonl"],
                                 "broken.jsonl: line 2 is not valid JSON"),
    "unsupported extension": ([*PRETRAIN, "--train_file", "{root}/notes.docx"], "notes.docx: unsupported extension"),
    "missing text column": ([*PRETRAIN, "--train_file", "{root}/rows.jsonl"],
                            "rows.jsonl (train): no column 'text'; columns are body"),
    "text column of numbers": ([*PRETRAIN, "--train_file", "{root}/numbers.jsonl"],
                               "numbers.jsonl (train): column 'text' holds int64 values, not text"),
    "text column of mixed types": ([*PRETRAIN, "--train_file", "{root}/mixed_text.jsonl"], MIXED_TEXT),
    "corpus shorter than a block": ([*PRETRAIN, "--train_file", "{root}/short.txt"], "fewer than one block"),
    "validation file alone": ([*PRETRAIN, "--validation_file", "{root}/short.txt"],
                              "validation_file needs a train_file"),
    # QA data
    "missing question column": ([*QA, "--train_file", "{root}/no_question.jsonl"],
                                "no_question.jsonl (train): no column 'question'"),
    "non-string answer": ([*QA, "--train_file", "{root}/int_answer.jsonl"], MIXED_ANSWERS),
    "every answer longer than max_length": ([*QA, "--train_file", "{root}/long_answers.jsonl"],
                                            "long_answers.jsonl: no example fits max_length=32"),
    # flags and values
    "unknown flag": ([*PRETRAIN, "--lerning_rate", "0.1"],
                     "unknown option --lerning_rate (did you mean '--learning_rate'?)"),
    "hub token as a flag": ([*PRETRAIN, "--hub_token", "hf_secret"], "--hub_token may not be given"),
    "bad choice": ([*PRETRAIN, "--sample_by", "word"], "argument --sample_by/--sample-by: invalid choice: 'word'"),
    "zero learning rate": ([*PRETRAIN, "--learning_rate", "0"], "learning_rate must be > 0, got 0.0"),
    "negative learning rate": ([*PRETRAIN, "--learning_rate", "-0.001"], "learning_rate must be > 0, got -0.001"),
    "zero batch size": ([*PRETRAIN, "--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    "zero steps": ([*PRETRAIN, "--max_steps", "0"], "nothing to train: max_steps=0"),
    "negative steps and no epochs": ([*PRETRAIN, "--max_steps", "-1", "--num_train_epochs", "0"], "nothing to train"),
    "block_size over n_positions": ([*PRETRAIN, "--block_size", "256", "--n_positions", "128"],
                                    "block_size=256 exceeds the model's n_positions=128"),
    "heads do not divide the width": ([*PRETRAIN, "--n_embd", "64", "--n_head", "3"],
                                      "n_embd=64 must be divisible by n_head=3"),
    "empty loss chunk": ([*PRETRAIN, "--chunked_loss_tokens", "0"], "chunked_loss_tokens must be >= 1, got 0"),
    "trained tokenizer for a pretrained model": (
        [*PRETRAIN, "--model_name_or_path", "{root}/gpt2-tiny", "--block_size", "64"],
        "train_tokenizer: true makes a vocabulary that"),
    "trained and named tokenizer": (
        [*PRETRAIN, "--vocab_file", "{root}/empty.txt", "--merges_file", "{root}/empty.txt"],
        "train_tokenizer: true and vocab_file / merges_file both choose the tokenizer"),
    "everything held out": ([*PRETRAIN, "--validation_split_percentage", "100"], "validation_split_percentage"),
    "vocab file without merges": (
        [*SMALL_GIVEN_TOKENIZER, "--train_tokenizer", "false", "--vocab_file", "{root}/empty.txt"],
        "vocab_file and merges_file go together"),
    # models, checkpoints, output directories
    "tokenizer larger than the embeddings": (
        [*SMALL_GIVEN_TOKENIZER, "--model_name_or_path", "{root}/gpt2-64-rows", "--tokenizer_name_or_path",
         "{root}/gpt2-tiny", "--train_tokenizer", "false"],
        "gpt2-64-rows: tokenizer has 50257 tokens but the model has 64 embedding rows"),
    "model with a torn safetensors file": (
        [*SMALL_GIVEN_TOKENIZER, "--model_name_or_path", "{root}/gpt2-torn", "--train_tokenizer", "false"],
        "gpt2-torn: cannot load a safetensors model"),
    "model shipped only as a pickle": (
        [*SMALL_GIVEN_TOKENIZER, "--model_name_or_path", "{root}/gpt2-pickle", "--train_tokenizer", "false"],
        "gpt2-pickle: not a whole model directory, missing weights (*.safetensors; pytorch_model.bin is a pickle"
        " and is never loaded)"),
    "checkpoint with a corrupted safetensors file": (
        [*PRETRAIN, "--resume_from_checkpoint", "{root}/run/checkpoint-3"],
        "resume_from_checkpoint: {root}/run/checkpoint-3/model.safetensors: damaged or incomplete"),
    "output_dir holding another run": ([*PRETRAIN, "--n_layer", "2"],
                                       "{out}/recipe.yaml: output_dir holds another run (n_layer 4 -> 2)"),
}


# Found by this battery in code owned elsewhere; strict, so the marker must go when the bug is fixed.
KNOWN_BUGS: dict[str, str] = {}  # name -> reason, for a case that is known to fail (strict xfail)
# Over 2 s each (3.7-4.2 s measured; the corpus is prepared before the model is loaded): out of `pytest -m "not slow"`.
SLOW = {"tokenizer larger than the embeddings", "model with a torn safetensors file"}


def case(name):
    marks = [pytest.mark.slow] if name in SLOW else []
    if name in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
    return pytest.param(name, marks=marks, id=name)


def snapshot(directory):
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("name", [case(name) for name in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_no_finished_run(name, root, tmp_path, capsys):
    flags, expected = BAD_INPUTS[name]
    output = tmp_path / "out"
    if name == "output_dir holding another run":  # another run's recipe (the default one) and checkpoint
        output.mkdir()
        shutil.copy(REPO / "recipes" / "pretrain" / "default.yaml", output / "recipe.yaml")
        complete_looking_checkpoint(output / "checkpoint-3", b"")
    before = snapshot(output)
    command = [flag.format(root=root) for flag in flags] + ["--output_dir", str(output), "--report_to", "none"]
    code = main(command)
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # progress bars and library warnings may come before it
    assert code == 2
    assert last_line.startswith("error: ") and expected.format(root=root, out=output) in last_line
    assert "Traceback" not in err
    assert snapshot(output) == before  # nothing written, so nothing looks like a finished run


SUBPROCESS_CASES = {
    "pipeline script, missing data file": (
        [str(REPO / "pipelines" / "pretrain.py"), "--train_file", "{tmp}/missing.txt"],
        "error: {tmp}/missing.txt: data file not found"),
    "console entry point, yaml that does not parse": (
        ["-m", "lmpipe", "pretrain", "{tmp}/broken.yaml"],
        "error: {tmp}/broken.yaml: line 2 is not valid YAML (found unexpected end of stream)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_real_processes_exit_2_with_one_line(name, tmp_path):
    (tmp_path / "broken.yaml").write_text("output_dir: 'unclosed\n")
    args, expected = SUBPROCESS_CASES[name]
    result = subprocess.run(
        [sys.executable, *[a.format(tmp=tmp_path) for a in args], "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == expected.format(tmp=tmp_path)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
