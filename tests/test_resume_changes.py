"""A resumed run is the same run: what may change between resumes is applied, what may not is refused
(`run/identity.py`'s RESUME_KEYS; issue 24, W2 to W4).

- W2: a new learning rate, schedule length and logging / save cadence are used from the resumed step on: the rates
  the optimizer uses and the run logs are the hand-computed cosine schedule of the new settings.
- W3: a data file replaced under the same path is refused, naming it; a resume loads the tokenizer saved with its
  checkpoint and never trains one.
- W4: another batch geometry (batch size, accumulation, number of processes) is refused, naming key and values.
"""

import json
import math
import re
import shutil

import pytest
from transformers import AutoTokenizer, TrainerCallback

from lmpipe.cli import main
from lmpipe.config.arguments import PRETRAIN_GROUPS, RunTrainingArguments
from lmpipe.config.recipe import parse_recipe
from lmpipe.run import identity
from lmpipe.run.files import write_resolved_recipe
from lmpipe.run.manifest import MANIFEST_NAME

from conftest import REPO, arm, tiny_run, write_pydoc_corpus

LEARNING_RATE, WARMUP = 0.003, 2
TINY = tiny_run(
    per_device_eval_batch_size=16, seed=3, save_steps=4, logging_steps=2, validation_split_percentage=25,
    learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=WARMUP,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_pydoc_corpus(tmp_path_factory.mktemp("changes") / "corpus.txt", 12)


def command(corpus, output, max_steps, *flags):
    return ["pretrain", "--train_file", str(corpus), "--output_dir", str(output), *TINY, "--max_steps", str(max_steps),
            *flags]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A run finished at 4 steps, with checkpoint-4."""
    output = tmp_path_factory.mktemp("finished") / "run"
    assert main(command(corpus, output, 4)) == 0
    return output


def cosine(step, base, total):
    """transformers' cosine schedule with linear warmup, by hand: the rate after `step` scheduler steps."""
    if step < WARMUP:
        return base * step / WARMUP
    return base * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (total - WARMUP)))


class RecordRates(TrainerCallback):
    """The rate each optimizer step used (read before the scheduler moves on), and the run's final log history."""

    def __init__(self):
        self.used, self.history = {}, []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, args, state, control, **kwargs):
        self.history = state.log_history


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_new_learning_rate_schedule_length_and_cadence_apply_from_the_resumed_step(corpus, finished, tmp_path,
                                                                                      monkeypatch):
    history = json.loads((finished / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    logged = {row["step"]: row["learning_rate"] for row in history if "learning_rate" in row}
    # the Trainer logs the rate step N used: the schedule after N - 1 scheduler steps
    assert logged == {step: pytest.approx(cosine(step - 1, LEARNING_RATE, 4), rel=1e-9) for step in (2, 4)}

    output = shutil.copytree(finished, tmp_path / "run")
    rates = RecordRates()
    arm(monkeypatch, rates)
    new = ["--learning_rate", "0.001", "--logging_steps", "1", "--save_steps", "3"]
    assert main(command(corpus, output, 8, *new)) == 0
    assert json.loads((output / "metrics.json").read_text())["resumed_from"] == str(output / "checkpoint-4")
    for step in (5, 6, 7, 8):  # as an uninterrupted run with learning_rate 1e-3 and max_steps 8 would
        assert rates.used[step] == pytest.approx(cosine(step - 1, 0.001, 8), rel=1e-9), step
    logged = {row["step"]: row["learning_rate"] for row in rates.history if "loss" in row}
    assert sorted(logged) == [2, 4, 5, 6, 7, 8]  # logging_steps 1 from step 5 on
    assert all(logged[step] == rates.used[step] for step in (5, 6, 7, 8))
    assert (output / "checkpoint-6").is_dir()  # save_steps 3 (the checkpoint's 4 would save at 8 only)
    recipe = (output / "recipe.yaml").read_text()
    assert "learning_rate: 0.001" in recipe and "max_steps: 8" in recipe
    card = (output / "README.md").read_text()
    assert ("- from step 4: learning_rate 0.003 -> 0.001; max_steps 4 -> 8; logging_steps 2 -> 1; save_steps 4 -> 3"
            in card)


@pytest.mark.slow
def test_a_resume_loads_its_checkpoints_tokenizer_and_never_trains_one(corpus, finished, tmp_path, monkeypatch):
    import lmpipe.model.tokenizer

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run trained its tokenizer again")

    monkeypatch.setattr(lmpipe.model.tokenizer, "train_bpe_tokenizer", no_training)
    output = shutil.copytree(finished, tmp_path / "run")
    assert main(command(corpus, output, 6)) == 0
    assert json.loads((output / "metrics.json").read_text())["resumed_from"] == str(output / "checkpoint-4")
    saved = AutoTokenizer.from_pretrained(finished / "checkpoint-4").get_vocab()
    assert AutoTokenizer.from_pretrained(output).get_vocab() == saved


@pytest.mark.slow
def test_a_resume_that_fails_to_load_its_checkpoint_leaves_the_runs_record(corpus, finished, tmp_path, monkeypatch):
    """identity.json and recipe.yaml say whose run it is: a failed attempt must not rewrite them (issue 24 review)."""
    from transformers import Trainer

    def fails(self, checkpoint):
        raise ValueError("loaded state dict has a different number of parameter groups")

    output = shutil.copytree(finished, tmp_path / "run")
    before = {name: (output / name).read_bytes() for name in ("identity.json", "recipe.yaml", "metrics.json")}
    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", fails)
    with pytest.raises(ValueError, match="parameter groups"):
        main(command(corpus, output, 6, "--learning_rate", "0.001"))
    assert {name: (output / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_a_data_file_replaced_under_the_same_path_is_refused_naming_it(corpus, finished, tmp_path, capsys):
    output = shutil.copytree(finished, tmp_path / "run")
    text = corpus.read_text(encoding="utf-8")
    try:
        corpus.write_text(text[: len(text) // 2] + text[len(text) // 2:].upper(), encoding="utf-8")  # same size
        capsys.readouterr()
        assert main(command(corpus, output, 6)) == 2
        line = last_error(capsys)
    finally:
        corpus.write_text(text, encoding="utf-8")
    assert re.fullmatch(
        rf"error: {output}/recipe.yaml: output_dir holds another run \({corpus}: content changed since the run"
        rf" started \(([\d,]+) bytes, sampled sha256 \w{{12}} -> \1 bytes, sampled sha256 \w{{12}}\)\); use another"
        r" output_dir, or set overwrite_output_dir: true to replace it",
        line,
    ), line
    assert not (output / "checkpoint-6").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, change, named", [
    ("gradient_accumulation_steps", "2", "gradient_accumulation_steps 1 -> 2", False),
    ("per_device_train_batch_size", "2", "per_device_train_batch_size 4 -> 2", False),
    ("gradient_accumulation_steps", "2", "gradient_accumulation_steps 1 -> 2", True),  # --resume_from_checkpoint
])
def test_another_batch_geometry_is_refused_naming_the_key_and_both_values(
    corpus, finished, tmp_path, capsys, flag, value, change, named
):
    output = shutil.copytree(finished, tmp_path / "run")
    resume = ["--resume_from_checkpoint", str(output / "checkpoint-4")] if named else []
    assert main(command(corpus, output, 6, f"--{flag}", value, *resume)) == 2
    assert f"output_dir holds another run ({change});" in last_error(capsys)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]


@pytest.mark.slow
def test_a_run_of_two_processes_is_refused_on_one(corpus, finished, tmp_path, capsys):
    output = shutil.copytree(finished, tmp_path / "run")
    recorded = json.loads((output / "identity.json").read_text())
    assert recorded["settings"]["world_size"] == 1 and str(corpus) in recorded["files"]
    recorded["settings"]["world_size"] = 2  # as a run of 2 processes records it
    (output / "identity.json").write_text(json.dumps(recorded))
    assert main(command(corpus, output, 6)) == 2
    assert "output_dir holds another run (world_size 2 -> 1);" in last_error(capsys)


@pytest.mark.slow
def test_a_named_checkpoint_of_two_processes_is_refused_on_one(corpus, finished, tmp_path, capsys):
    """Its own RNG files say how many processes saved it (the Trainer alone resumes without rng_state.pth)."""
    checkpoint = shutil.copytree(finished / "checkpoint-4", tmp_path / "checkpoint-4")
    (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")
    shutil.copy(checkpoint / "rng_state_0.pth", checkpoint / "rng_state_1.pth")
    (checkpoint / MANIFEST_NAME).unlink()  # its sha256 manifest lists one process's files: as if saved before manifests
    assert main(command(corpus, tmp_path / "run", 6, "--resume_from_checkpoint", str(checkpoint))) == 2
    assert last_error(capsys) == (
        f"error: resume_from_checkpoint: {checkpoint} was saved by 2 process(es), this run has 1: world_size may not"
        " change between resumes (it would skip or repeat data); launch 2 process(es)"
    )


def test_a_checkpoint_of_one_process_is_refused_on_two(tmp_path, monkeypatch):
    """The recorded world size against this launch's, without launching two processes."""
    args = ["--train_file", "corpus.txt", "--output_dir", str(tmp_path)]
    recipe = parse_recipe(args, groups=PRETRAIN_GROUPS)
    (tmp_path / "recipe.yaml").write_text("train_file: corpus.txt\n")
    identity.record_identity(recipe, str(tmp_path), None)
    assert identity.identity_changes(recipe, str(tmp_path)) == []
    monkeypatch.setattr(RunTrainingArguments, "world_size", property(lambda self: 2))
    assert identity.identity_changes(recipe, str(tmp_path)) == ["world_size 1 -> 2"]
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    assert identity.checkpoint_world_size(checkpoint) is None  # save_only_model: no RNG files
    (checkpoint / "rng_state.pth").touch()
    assert identity.checkpoint_world_size(checkpoint) == 1
    (checkpoint / "rng_state.pth").unlink()
    for rank in (0, 1):
        (checkpoint / f"rng_state_{rank}.pth").touch()
    assert identity.checkpoint_world_size(checkpoint) == 2


def test_the_reliability_page_lists_the_resume_keys_as_the_code_classifies_them():
    page = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (may change|may not change) \|", page, flags=re.MULTILINE))
    assert rows == {key: "may change" if changeable else "may not change"
                    for key, (changeable, _) in identity.RESUME_KEYS.items()}


def test_an_edited_file_of_the_same_size_changes_its_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "FINGERPRINT_BLOCK_BYTES", 16)  # 64 sampled blocks of 16 bytes
    path = tmp_path / "big.txt"
    path.write_bytes(bytes(range(256)) * 64)
    before = identity.file_fingerprint(str(path))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last block is always sampled
    path.write_bytes(bytes(data))
    assert identity.file_fingerprint(str(path)) != before and before.startswith(f"{len(data)}:")


def test_a_key_the_recorded_settings_lack_is_compared_as_recipe_yaml_writes_it(tmp_path):
    """A run recorded before the table listed a key: its recipe.yaml still says the value the run used."""
    args = ["--train_file", "corpus.txt", "--output_dir", str(tmp_path)]
    recipe = parse_recipe(args, groups=PRETRAIN_GROUPS)
    (tmp_path / "recipe.yaml").write_text("train_file: corpus.txt\ngradient_accumulation_steps: 2\n")
    identity.record_identity(recipe, str(tmp_path), None)
    recorded = json.loads((tmp_path / "identity.json").read_text())
    del recorded["settings"]["gradient_accumulation_steps"]
    (tmp_path / "identity.json").write_text(json.dumps(recorded))
    assert identity.identity_changes(recipe, str(tmp_path)) == ["gradient_accumulation_steps 2 -> 1"]


def test_a_new_learning_rate_under_reduce_lr_on_plateau_is_refused(tmp_path):
    """That scheduler's restored state holds the rate: a new learning_rate would be recorded and never used."""
    args = ["--train_file", "corpus.txt", "--output_dir", str(tmp_path), "--lr_scheduler_type", "reduce_lr_on_plateau",
            "--eval_strategy", "steps", "--learning_rate", "0.003"]
    recipe = parse_recipe(args, groups=PRETRAIN_GROUPS)
    identity.record_identity(recipe, str(tmp_path), None)
    write_resolved_recipe(recipe, str(tmp_path))
    assert identity.identity_changes(parse_recipe([*args, "--weight_decay", "0.1"], groups=PRETRAIN_GROUPS),
                                     str(tmp_path)) == []
    changed = parse_recipe([*args, "--learning_rate", "0.001"], groups=PRETRAIN_GROUPS)
    assert identity.identity_changes(changed, str(tmp_path)) == [
        "learning_rate 0.003 -> 0.001, which lr_scheduler_type reduce_lr_on_plateau would not apply (it keeps the"
        " checkpoint's rate)"
    ]


def test_a_tokenizer_directory_is_fingerprinted_by_its_tokenizer_files_alone(tmp_path):
    """A finished run's directory as tokenizer_name_or_path: its weights and manifest are not the tokenizer."""
    run = tmp_path / "previous"
    run.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json", MANIFEST_NAME):
        (run / name).write_text(name)
    args = ["--train_file", "corpus.txt", "--output_dir", str(tmp_path / "run"), "--tokenizer_name_or_path", str(run)]
    fingerprints = identity.input_fingerprints(parse_recipe(args, groups=PRETRAIN_GROUPS))
    assert sorted(fingerprints) == [str(run / "tokenizer.json"), str(run / "tokenizer_config.json")]
