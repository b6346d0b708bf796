"""The layout of a run's output directory, and the one way lmpipe writes its files there.

Low in the run's lifecycle on purpose: training writes these files and the Hub upload, the model card and the
loss check read them, so none of those has to import another for a file name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from transformers import GPT2TokenizerFast
from transformers.tokenization_utils_base import (
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_FILE,
    FULL_TOKENIZER_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

from lmpipe.config.recipe import Recipe

RESOLVED_RECIPE_NAME = "recipe.yaml"  # the run's resolved recipe: written first, compared on every rerun
IDENTITY_NAME = "identity.json"  # what recipe.yaml only names: file contents, processes; resumes that changed keys
METRICS_NAME = "metrics.json"  # written last: its presence marks a finished run
PLOT_NAME = "loss.png"
CARD_NAME = "README.md"  # the model card, as the Hub shows it
TENSORBOARD_DIR = "runs"  # the Hub shows TensorBoard logs found here as "Training metrics"
# A saved model's files, as `save_model` writes them and `from_pretrained` reads them.
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, ADAPTER_SAFE_WEIGHTS_NAME)
MODEL_FILES = (CONFIG_NAME, GENERATION_CONFIG_NAME, ADAPTER_CONFIG_NAME, *WEIGHT_FILES)
TOKENIZER_FILES = (
    FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE, CHAT_TEMPLATE_FILE,
    *GPT2TokenizerFast.vocab_files_names.values(),
)


def present(folder: Path, names) -> dict[str, Path]:
    return {name: folder / name for name in names if (folder / name).is_file()}


def model_files(folder: Path) -> dict[str, Path]:
    """Config, safetensors weights (with their shards) and tokenizer files: what `from_pretrained` needs."""
    files = present(folder, MODEL_FILES + TOKENIZER_FILES)
    if SAFE_WEIGHTS_INDEX_NAME in files:
        shards = json.loads(files[SAFE_WEIGHTS_INDEX_NAME].read_text("utf-8"))["weight_map"].values()
        files.update(present(folder, sorted(set(shards))))
    return files


def write_text_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader (or a rerun after a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_resolved_recipe(recipe: Recipe, output_dir: str) -> Path:
    """Write `recipe.yaml` atomically so a later run can compare or rerun it."""
    path = Path(output_dir) / RESOLVED_RECIPE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(recipe.resolved(), sort_keys=False))
    return path
