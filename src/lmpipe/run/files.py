"""The layout of a run's output directory, and the one way lmpipe writes its files there.

Low in the run's lifecycle on purpose: training writes these files and the Hub upload, the model card and the
loss check read them, so none of those has to import another for a file name.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lmpipe.config.recipe import Recipe

RESOLVED_RECIPE_NAME = "recipe.yaml"  # the run's resolved recipe: written first, compared on every rerun
IDENTITY_NAME = "identity.json"  # what recipe.yaml only names: file contents, processes; resumes that changed keys
METRICS_NAME = "metrics.json"  # written last: its presence marks a finished run
PLOT_NAME = "loss.png"
CARD_NAME = "README.md"  # the model card, as the Hub shows it
TENSORBOARD_DIR = "runs"  # the Hub shows TensorBoard logs found here as "Training metrics"


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
