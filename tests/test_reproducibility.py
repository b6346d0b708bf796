"""Same recipe and seed, same run: identical losses step by step and identical weights on CPU in fp32.
And safety: no Hub token in any output, remote code only when asked (with a warning), no unpickling."""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from lmpipe.cli import DEFAULT_PRETRAIN_RECIPE, main
from lmpipe.config.arguments import ModelArguments
from lmpipe.config.recipe import parse_recipe
from lmpipe.model.build import load_pretrained
from lmpipe.model.tokenizer import load_tokenizer
from lmpipe.run.checkpoints import checkpoint_problem

from conftest import tiny_run

FAKE_TOKEN = "hf_reproFakeToken0123456789abcdefQRS"
RUN = tiny_run(
    n_layer=2, dropout=0.1, max_steps=8, per_device_eval_batch_size=16, learning_rate=0.003, eval_strategy="steps",
    eval_steps=4, save_steps=4, logging_steps=1, report_to="tensorboard", seed=11, validation_split_percentage=25,
    log_level="info",
)  # dropout on: the seed must fix the dropout masks as well as the initial weights and the data order; info logs



@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same command twice: in this process, then in a real one with a Hub token in its environment.

    Returns both output directories and the second process's whole console output.
    """
    from lmpipe.data.sources import pydoc_documents

    root = tmp_path_factory.mktemp("repro")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_documents())[:1600], encoding="utf-8")
    first, second = root / "first", root / "second"
    assert main(["pretrain", "--train_file", str(corpus), "--output_dir", str(first), *RUN]) == 0
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lmpipe", "pretrain", "--train_file", str(corpus), "--output_dir", str(second),
         *RUN],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return first, second, result.stdout + result.stderr


def step_losses(output):
    history = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    return [(row["step"], row["loss"]) for row in history if "loss" in row]


@pytest.mark.slow
def test_same_recipe_and_seed_give_identical_losses_and_weights(two_runs):
    first, second, _ = two_runs
    assert step_losses(first) == step_losses(second) and len(step_losses(first)) == 8
    assert json.loads((first / "metrics.json").read_text())["eval_loss"] == json.loads(
        (second / "metrics.json").read_text()
    )["eval_loss"]
    weights, again = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


@pytest.mark.slow
def test_a_different_seed_changes_the_run(two_runs, tmp_path):
    """Otherwise the test above could pass with a seed that is ignored."""
    first, _, _ = two_runs
    args = ["pretrain", "--train_file", str(first.parent / "corpus.txt"), "--output_dir", str(tmp_path / "other"), *RUN]
    args[args.index("--seed") + 1] = "12"
    args[args.index("--max_steps") + 1] = "1"
    assert main(args) == 0
    history = json.loads((tmp_path / "other" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert history[0]["loss"] != step_losses(first)[0][1]


@pytest.mark.slow
def test_the_hub_token_appears_in_no_output_file_and_no_log(two_runs):
    _, with_token, console = two_runs
    assert "***** Running training *****" in console  # info-level logs were on
    assert FAKE_TOKEN not in console
    files = [p for p in with_token.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"recipe.yaml", "trainer_state.json", "README.md", "metrics.json", "training_args.bin"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)  # TensorBoard logs
    leaks = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_the_resolved_recipe_reruns_the_same_arguments(two_runs):
    first, _, _ = two_runs
    again = parse_recipe([str(first / "recipe.yaml")])
    command = ["--train_file", str(first.parent / "corpus.txt"), "--output_dir", str(first), *RUN]
    original = parse_recipe(command, default_recipe=DEFAULT_PRETRAIN_RECIPE)  # as `lmpipe pretrain` parses it
    groups, original_groups = dict(again.groups), dict(original.groups)
    training, original_training = groups.pop("training"), original_groups.pop("training")
    assert groups == original_groups and training.to_dict() == original_training.to_dict()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer):
    directory = tmp_path_factory.mktemp("remote") / "tiny"
    GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_remote_code_is_off_by_default_and_warned_about_when_on(trust_remote_code, tiny_model_dir, caplog):
    from lmpipe.config.arguments import TokenizerArguments

    assert ModelArguments().trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="lmpipe"):
        load_tokenizer(TokenizerArguments(), str(tiny_model_dir), trust_remote_code=trust_remote_code)
        load_pretrained(str(tiny_model_dir), trust_remote_code=trust_remote_code)
    warned = [r.name for r in caplog.records if "trust_remote_code is on" in r.getMessage()]
    assert warned == (["lmpipe.model.tokenizer", "lmpipe.model.build"] if trust_remote_code else [])


class Exploit:
    """Unpickling this runs code: a checkpoint check must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_checking_a_checkpoint_never_unpickles_it(two_runs, tmp_path):
    first, _, _ = two_runs
    checkpoint = shutil.copytree(first / "checkpoint-8", tmp_path / "checkpoint-8")
    marker = tmp_path / "code-ran"
    torch.save({"state": Exploit(marker)}, checkpoint / "optimizer.pt")
    with zipfile.ZipFile(checkpoint / "optimizer.pt") as archive:  # it really is a pickle that calls io.open
        assert b"cio\nopen\n" in archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    problem = checkpoint_problem(checkpoint)  # its values are read with the weights-only loader, which refuses it
    assert problem == (
        f"{checkpoint / 'optimizer.pt'}: not loadable with weights_only (Unsupported global: GLOBAL io.open was not"
        " an allowed global by default)"
    )
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and the Trainer's own load (weights_only=True) refuses it
        torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert not marker.exists()
