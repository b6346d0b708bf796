"""Every recipe value is checked before any data is read, and reading errors name the file and row: one line
`error: ...`, exit code 2, and nothing written to the output directory."""

import json
import re
from pathlib import Path

import pytest

import lmpipe.pretrain  # noqa: F401  imported before capsys: library loggers keep the stderr they first see
from lmpipe.cli import main
from lmpipe.errors import LmpipeError

SMALL = ["pretrain", "--block_size", "32", "--tokenizer_vocab_size", "300", "--max_steps", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    files = {
        "duplicate.yaml": "learning_rate: 0.001\nn_layer: 2\nlearning_rate: 0.1\n",
        "null_layers.yaml": "n_layer: null\n",
        "null_optional.yaml": "validation_file: null\nn_layer: -2\n",  # the null is fine; the -2 is not
        "dropout.yaml": "dropout: 1.5\n",
        "cosine.yaml": "dataset_name: builtin:pydoc\nlr_scheduler_type: cosine\n",  # no decay_fraction to keep
    }
    for name, text in files.items():
        (root / name).write_text(text)
    paragraphs = [f"Paragraph {i} of a small corpus, long enough to make a few blocks of text." for i in range(40)]
    (root / "null_row.jsonl").write_text("".join(json.dumps({"text": None if i == 6 else p}) + "\n"
                                                 for i, p in enumerate(paragraphs)))
    (root / "null_row.csv").write_text("id,text\n" + "".join(f"{i},{'' if i == 3 else p}\n"
                                                             for i, p in enumerate(paragraphs)))
    (root / "a_directory").mkdir()
    return root


CASES = {
    # recipe files
    "duplicate yaml key": (["pretrain", "{root}/duplicate.yaml"],
                           "duplicate.yaml: line 3 is not valid YAML "
                           "(duplicate key 'learning_rate' (first on line 1))"),
    "null for a key with a default": (["pretrain", "{root}/null_layers.yaml"],
                                      "null_layers.yaml: 'n_layer' is null; "
                                      "give it a value or remove the line (default: 4)"),
    "null for an optional key is no value": (["pretrain", "{root}/null_optional.yaml"],
                                             "null_optional.yaml: n_layer must be >= 1, got -2"),
    "out of range in the file names the file": (["pretrain", "{root}/dropout.yaml"],
                                                "dropout.yaml: dropout must be in [0, 1), got 1.5"),
    "a flag overriding the file is the flag's fault": (["pretrain", "{root}/dropout.yaml", "--dropout", "-0.1"],
                                                       "error: dropout must be in [0, 1), got -0.1"),
    # values
    "no layers": ([*SMALL, "--n_layer", "-1"], "error: n_layer must be >= 1, got -1"),
    "infinite learning rate": ([*SMALL, "--learning_rate", "inf"],
                               "error: learning_rate must be a finite number, got inf"),
    "nan weight decay": ([*SMALL, "--weight_decay", "nan"], "error: weight_decay must be a finite number, got nan"),
    "beta of 1": ([*SMALL, "--adam_beta2", "1"], "error: adam_beta2 must be in [0, 1), got 1.0"),
    "unknown attention": ([*SMALL, "--attn_implementation", "flash"],
                          "error: attn_implementation must be one of eager,"),
    "save_total_limit 0 would keep every checkpoint": ([*SMALL, "--save_total_limit", "0"],
                                                       "error: save_total_limit must be >= 1, got 0"),
    "max_train_documents 0 would keep all": ([*SMALL, "--max_train_documents", "0"],
                                            "error: max_train_documents must be >= 1, got 0"),
    "negative seed": ([*SMALL, "--seed", "-1"], "error: seed must be in [0, 2**32), got -1"),
    "vocabulary smaller than the bytes": ([*SMALL, "--tokenizer_vocab_size", "100"],
                                          "error: tokenizer_vocab_size must be >= 257"),
    "block of one token": ([*SMALL, "--block_size", "1"], "error: block_size must be >= 2, got 1"),
    "negative max_steps": ([*SMALL, "--max_steps", "-5"],
                           "error: max_steps must be >= -1 (-1: train num_train_epochs)"),
    "LoRA dropout of 1": (["finetune-qa", "--model_name_or_path", "m", "--lora_dropout", "1"],
                         "error: lora_dropout must be in [0, 1), got 1.0"),
    # optimizer and schedule keys with what they work with
    "Muon's momentum of 1": ([*SMALL, "--optimizer", "muon", "--muon_momentum", "1"],
                             "error: muon_momentum must be in [0, 1), got 1.0"),
    "a Muon key without Muon": ([*SMALL, "--optimizer", "adamw", "--muon_learning_rate", "0.01"],
                                "error: muon_learning_rate is for optimizer: muon, got optimizer: adamw"),
    "Muon with LoRA": (["finetune-qa", "--model_name_or_path", "m", "--use_lora", "true", "--optimizer", "muon"],
                       "error: optimizer: muon trains whole weight matrices, not LoRA adapters: use optimizer: adamw"),
    "Muon beside another optim": ([*SMALL, "--optimizer", "muon", "--optim", "sgd"],
                                  "error: optimizer: muon runs torch's AdamW beside Muon: optim must be adamw_torch "
                                  "or adamw_torch_fused, got sgd"),
    "a decay fraction with cosine": ([*SMALL, "--lr_scheduler_type", "cosine", "--decay_fraction", "0.3"],
                                     "error: decay_fraction is for lr_scheduler_type: warmup_stable_decay, got cosine"),
    "warmup_stable_decay without its decay": (["pretrain", "{root}/cosine.yaml", "--lr_scheduler_type",
                                               "warmup_stable_decay"],
                                              "error: lr_scheduler_type: warmup_stable_decay needs decay_fraction"),
    "a decay fraction and num_decay_steps": ([*SMALL, "--lr_scheduler_type", "warmup_stable_decay",
                                              "--decay_fraction", "0.3", "--lr_scheduler_kwargs",
                                              '{{"num_decay_steps": 5}}'],
                                             "error: set decay_fraction or lr_scheduler_kwargs' num_decay_steps, "
                                             "not both"),
    "a decay fraction of 0": ([*SMALL, "--lr_scheduler_type", "warmup_stable_decay", "--decay_fraction", "0"],
                              "error: decay_fraction must be in (0, 1], got 0.0"),
    # data files
    "null text in a jsonl row": ([*SMALL, "--train_file", "{root}/null_row.jsonl"],
                                 "error: {root}/null_row.jsonl row 7: column 'text' is null (no text)"),
    "empty text cell in a csv row": ([*SMALL, "--train_file", "{root}/null_row.csv"],
                                     "error: {root}/null_row.csv row 4: column 'text' is null (no text)"),
    "a directory as the train file": ([*SMALL, "--train_file", "{root}/a_directory"],
                                      "error: {root}/a_directory: a directory, not a data file"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_value_is_one_line_before_any_output(name, root, tmp_path, capsys):
    flags, expected = CASES[name]
    output = tmp_path / "out"
    argv = [flag.format(root=root) for flag in flags] + ["--output_dir", str(output), "--report_to", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert expected.format(root=root) in last_line and last_line.startswith("error: ")
    assert "Traceback" not in err
    assert not output.exists()


@pytest.mark.parametrize("argv", [
    ["finetune-qa", "--model_name_or_path", "m", "--max_length", "1"],
    ["evaluate", "m", "--task", "perplexity", "--data", "d", "--max_length", "1"],
], ids=["QA rows", "zero-shot windows"])
def test_a_shared_rule_reads_the_same_for_every_command(argv, capsys):
    """One rule per key, whichever command has it: max_length bounds QA rows and zero-shot windows alike."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: max_length must be >= 2, got 1"


def test_an_unreadable_data_file_is_one_line(root, tmp_path, capsys, monkeypatch):
    """As root in CI a chmod 000 file stays readable, so the read itself is made to fail as it does for a user."""
    corpus = root / "null_row.jsonl"
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == corpus:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    assert main([*SMALL, "--train_file", str(corpus), "--output_dir", str(tmp_path / "out"),
                 "--report_to", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {corpus}: cannot read the data file (Permission denied)"
    )


def _pretrain_with(output, change):
    from lmpipe.cli import DEFAULT_PRETRAIN_RECIPE
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.pretrain import pretrain

    recipe = parse_recipe(["--output_dir", str(output)], default_recipe=DEFAULT_PRETRAIN_RECIPE)
    change(recipe)
    pretrain(recipe)


def _finetune_with(output, change):
    from lmpipe.config.arguments import FINETUNE_QA_GROUPS
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.finetune import finetune_qa

    recipe = parse_recipe(["--model_name_or_path", "none", "--output_dir", str(output)], groups=FINETUNE_QA_GROUPS)
    change(recipe)
    finetune_qa(recipe)


def _perplexity_with(output, change):
    from lmpipe.zero_shot.perplexity import EvaluateArguments, evaluate_file

    args = EvaluateArguments(model_name_or_path=str(output), validation_file=str(output))
    change(args)
    evaluate_file(args)


API_CASES = {
    "pretrain": (_pretrain_with, lambda r: setattr(r.model, "n_layer", 0), "n_layer must be >= 1, got 0"),
    "pretrain, training": (_pretrain_with, lambda r: setattr(r.training, "learning_rate", 0.0),
                           "learning_rate must be > 0, got 0.0"),
    "finetune_qa": (_finetune_with, lambda r: setattr(r.lora, "lora_r", 0), "lora_r must be >= 1, got 0"),
    "perplexity": (_perplexity_with, lambda a: setattr(a, "batch_size", 0), "batch_size must be >= 1, got 0"),
}


@pytest.mark.parametrize("name", API_CASES)
def test_the_python_entry_points_apply_the_same_rules(name, tmp_path):
    """A recipe built or changed in Python meets the rules the command line applies (`config.rules.RULES`), with the
    same message, before anything is read or written."""
    run, change, message = API_CASES[name]
    with pytest.raises(LmpipeError, match=f"^{re.escape(message)}$"):
        run(tmp_path / "out", change)
    assert not (tmp_path / "out").exists()
