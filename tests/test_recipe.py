"""Recipes: YAML values, CLI overrides, unknown keys and bad values are one-line errors."""

from pathlib import Path

import pytest
import yaml

from lmpipe.config.arguments import FINETUNE_QA_GROUPS, PRETRAIN_GROUPS
from lmpipe.config.recipe import parse_recipe
from lmpipe.config.rules import check_optimizer
from lmpipe.errors import LmpipeError
from lmpipe.run.files import write_resolved_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_are_typed_and_flags_override(tmp_path):
    path = write(tmp_path, "n_layer: 3\nlearning_rate: 0.01\nblock_size: 64\nbf16: false\noutput_dir: out\n")
    recipe = parse_recipe([path, "--learning_rate", "0.5", "--n_head", "2"])
    model, data, training = recipe.model, recipe.data, recipe.training
    assert (model.n_layer, model.n_head, data.block_size) == (3, 2, 64)
    assert training.learning_rate == 0.5 and training.output_dir == "out" and training.bf16 is False


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "learning_rat: 0.1\n")
    with pytest.raises(LmpipeError,
                       match=r"recipe.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_recipe([path])


def test_unknown_flag(tmp_path):
    with pytest.raises(LmpipeError, match="unknown option --n_layers"):
        parse_recipe(["--n_layers", "3"])


def test_wrong_type_names_the_key_and_file(tmp_path):
    path = write(tmp_path, "n_layer: many\n")
    with pytest.raises(LmpipeError, match=r"recipe.yaml: argument --n_layer.*invalid int value: 'many'"):
        parse_recipe([path])


def test_broken_yaml_names_line(tmp_path):
    path = write(tmp_path, "n_layer: 2\nblock_size: [1, 2\n")
    with pytest.raises(LmpipeError, match=r"recipe.yaml: line \d+ is not valid YAML"):
        parse_recipe([path])


def test_hub_token_is_refused_in_a_recipe(tmp_path):
    with pytest.raises(LmpipeError, match="hub_token"):
        parse_recipe([write(tmp_path, "hub_token: hf_secret\n")])


def test_resolved_recipe_reruns_the_same_arguments(tmp_path):
    path = write(tmp_path, "n_layer: 3\nlr_scheduler_type: cosine\noutput_dir: out\n")
    recipe = parse_recipe([path, "--seed", "7"])
    written = write_resolved_recipe(recipe, str(tmp_path / "run"))
    assert yaml.safe_load(written.read_text()) == {
        "task": "pretrain",
        "n_layer": 3,
        "lr_scheduler_type": "cosine",
        "output_dir": "out",
        "seed": 7,
    }
    again = parse_recipe([str(written)])
    assert again.model.n_layer == 3 and again.training.seed == 7
    assert again.training.lr_scheduler_type == recipe.training.lr_scheduler_type


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CHAT_MIXTURE, NQ_OPEN = str(RECIPES / "finetune" / "chat_mixture.yaml"), str(RECIPES / "finetune" / "nq_open.yaml")
DEFAULT = str(RECIPES / "pretrain" / "default.yaml")
# name: (arguments, groups, the one-line error): a key the run would not read is refused, never ignored
UNUSED = {
    "QA key in a conversation recipe": ([CHAT_MIXTURE, "--question_column", "q"], FINETUNE_QA_GROUPS,
                                        "^--question_column is not used by this run: messages_column is set"),
    "validation file beside datasets": ([CHAT_MIXTURE, "--validation_file", "v.jsonl"], FINETUNE_QA_GROUPS,
                                        "^--validation_file is not used by this run: datasets lists the sources"),
    "chat key in a QA recipe": ([NQ_OPEN, "--learn_assistant_turns", "last"], FINETUNE_QA_GROUPS,
                                "^--learn_assistant_turns is not used by this run: only conversations"),
    "LoRA key without LoRA": ([NQ_OPEN, "--lora_r", "4"], FINETUNE_QA_GROUPS,
                              r"^--lora_r is not used by this run: only LoRA \(use_lora: true\)"),
    "stream key without streaming": ([DEFAULT, "--streaming_validation_documents", "5"], PRETRAIN_GROUPS,
                                     "^--streaming_validation_documents is not used by this run: only a streamed"),
    "Hub dataset beside a file": (["--train_file", "a.txt", "--dataset_name", "x/y"], PRETRAIN_GROUPS,
                                  "^--dataset_name is not used by this run: train_file is read instead"),
    "split share beside a validation file": (
        ["--train_file", "a.txt", "--validation_file", "b.txt", "--validation_split_percentage", "5"],
        PRETRAIN_GROUPS, "^--validation_split_percentage is not used by this run: validation_file is the validation"),
    "vocabulary size of no trained tokenizer": (
        [DEFAULT, "--train_tokenizer", "false", "--tokenizer_vocab_size", "300"], PRETRAIN_GROUPS,
        r"^--tokenizer_vocab_size is not used by this run: only train_tokenizer: true"),
}


@pytest.mark.parametrize("name", UNUSED)
def test_a_key_the_run_does_not_read_is_refused_in_one_line(name):
    argv, groups, message = UNUSED[name]
    with pytest.raises(LmpipeError, match=message):
        parse_recipe(argv, groups)


def test_a_recipe_that_sets_a_key_it_does_not_read_is_named(tmp_path):
    path = write(tmp_path, "messages_column: messages\ntrain_file: chats.jsonl\nprompt_template: 'Q: {question}'\n")
    with pytest.raises(LmpipeError, match="recipe.yaml: prompt_template is not used by this run: messages_column"):
        parse_recipe([path], FINETUNE_QA_GROUPS)


def test_a_flag_may_turn_off_what_a_recipe_key_is_for():
    """The default recipe's tokenizer_vocab_size under --train_tokenizer false: the user's choice, not a mistake."""
    assert parse_recipe([DEFAULT, "--train_tokenizer", "false"]).tokenizer.train_tokenizer is False


MUON_WSD_RECIPE = ("optimizer: muon\nmuon_learning_rate: 0.03\nmuon_momentum: 0.9\nlr_scheduler_type: "
                   "warmup_stable_decay\ndecay_fraction: 0.4\nmin_lr_ratio: 0.1\ndecay_type: linear\n")


def test_a_flag_moving_optimizer_or_schedule_drops_the_recipes_keys_only_the_old_one_reads(tmp_path):
    """`--optimizer adamw` on a Muon + WSD recipe (the default is one) is an AdamW run, `--lr_scheduler_type cosine`
    a cosine one: the file's muon_* / WSD keys go with the choice they belong to instead of refusing the run."""
    path = write(tmp_path, MUON_WSD_RECIPE)
    training = parse_recipe([path]).training
    assert (training.optimizer, training.muon_learning_rate, training.decay_fraction) == ("muon", 0.03, 0.4)
    for flags in (["--optimizer", "adamw"], ["--optimizer=adamw"]):
        recipe = parse_recipe([path, *flags])
        assert recipe.training.optimizer == "adamw"
        assert (recipe.training.muon_learning_rate, recipe.training.muon_momentum) == (None, None)
        assert "muon_learning_rate" not in recipe.explicit and recipe.training.decay_fraction == 0.4  # WSD stays
    training = parse_recipe([path, "--lr_scheduler_type", "cosine"]).training
    assert (training.decay_fraction, training.min_lr_ratio, training.decay_type) == (None, None, None)
    assert training.optimizer == "muon" and training.muon_learning_rate == 0.03  # Muon stays
    assert parse_recipe([path, "--optimizer", "muon"]).training.muon_momentum == 0.9  # the same choice keeps them
    # a Muon key given as a flag beside --optimizer adamw is the user's own mistake, refused as before
    with pytest.raises(LmpipeError, match="^muon_momentum is for optimizer: muon, got optimizer: adamw"):
        check_optimizer(parse_recipe([path, "--optimizer", "adamw", "--muon_momentum", "0.9"]).training)
    for flags in ([], ["--optimizer", "adamw"], ["--lr_scheduler_type", "cosine"]):  # what remains is consistent
        check_optimizer(parse_recipe([path, *flags]).training)


def test_a_data_source_on_the_command_line_replaces_the_recipes_whole_source():
    """show-data / finetune-qa of chat_mixture.yaml with --train_file reads that file, not the recipe's datasets."""
    recipe = parse_recipe([CHAT_MIXTURE, "--train_file", "mine.jsonl"], FINETUNE_QA_GROUPS)
    assert (recipe.data.train_file, recipe.data.datasets) == ("mine.jsonl", None)
    assert "datasets" not in recipe.explicit and recipe.data.messages_column == "messages"  # the rest stays
    recipe = parse_recipe([NQ_OPEN, "--dataset_name", "x/y"], FINETUNE_QA_GROUPS)
    assert (recipe.data.dataset_name, recipe.data.train_file) == ("x/y", None)
    recipe = parse_recipe([DEFAULT, "--train_file", "a.txt"])  # the default recipe's builtin:pydoc gives way
    assert recipe.data.train_file == "a.txt" and "dataset_name" not in recipe.explicit
    recipe = parse_recipe([NQ_OPEN, "--validation_file", "v.jsonl"], FINETUNE_QA_GROUPS)  # a validation file adds
    assert (recipe.data.train_file, recipe.data.validation_file) == ("data/nq_open_efficientqa_dev.jsonl", "v.jsonl")
