"""Recipes: YAML values, CLI overrides, unknown keys and bad values are one-line errors."""

import pytest
import yaml

from lmpipe.config.recipe import parse_recipe
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
