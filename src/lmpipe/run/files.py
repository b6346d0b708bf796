"""The layout of a run's output directory, and the one way lmpipe writes its files there.

Low in the data flow on purpose: training writes these files and the Hub upload, the model card and the loss
check read them, so none of those has to import another for a file name.
"""

from __future__ import annotations

import os
from pathlib import Path

RESOLVED_RECIPE_NAME = "recipe.yaml"  # the run's resolved recipe: written first, compared on every rerun
METRICS_NAME = "metrics.json"  # written last: its presence marks a finished run
PLOT_NAME = "loss.png"
CARD_NAME = "README.md"  # the model card, as the Hub shows it
TENSORBOARD_DIR = "runs"  # the Hub shows TensorBoard logs found here as "Training metrics"


def write_text_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader (or a rerun after a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
