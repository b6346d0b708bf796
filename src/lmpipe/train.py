"""The Trainer we run: exact token-weighted evaluation, resume from the last checkpoint, metrics and plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from lmpipe.errors import LmpipeError

METRICS_NAME = "metrics.json"
PLOT_NAME = "loss.png"


class ExactEvalTrainer(Trainer):
    """A Trainer whose `eval_loss` is total NLL / total scored tokens over all ranks.

    The stock `eval_loss` is a mean of per-batch means; it is kept, renamed `eval_batch_mean_loss`, for comparison.
    Needs `preprocess_logits_for_metrics=NllStatistics(...)` and `compute_metrics=compute_exact_metrics`.
    """

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        for key in [k for k in output.metrics if k.endswith("_exact_loss")]:
            prefix = key[: -len("_exact_loss")]
            output.metrics[f"{prefix}_batch_mean_loss"] = output.metrics.pop(f"{prefix}_loss", math.nan)
            output.metrics[f"{prefix}_loss"] = output.metrics.pop(key)
        return output


def check_training_arguments(args: TrainingArguments) -> None:
    """Values the Trainer accepts but that cannot train: caught before any data is loaded."""
    if not args.learning_rate > 0:
        raise LmpipeError(f"learning_rate must be > 0, got {args.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise LmpipeError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps == 0 or (args.max_steps < 0 and not args.num_train_epochs > 0):
        raise LmpipeError(f"nothing to train: max_steps={args.max_steps}, num_train_epochs={args.num_train_epochs}")


def last_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` directory of a previous run of this output directory, to resume from."""
    if not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(output_dir)


def write_json_atomically(payload: dict[str, Any], path: Path) -> None:
    """Write then rename, so a reader never sees half a file (metrics.json marks a finished run)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def plot_history(log_history: list[dict[str, Any]], path: Path) -> None:
    """Train/eval loss and eval perplexity against tokens seen (steps when tokens were not tracked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        rows = [row for row in log_history if key in row and math.isfinite(row[key])]
        return [row.get("num_input_tokens_seen", row.get("step", 0)) for row in rows], [row[key] for row in rows]

    x_label = "tokens seen" if any("num_input_tokens_seen" in row for row in log_history) else "step"
    figure, (loss_axis, ppl_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss (exact)")):
        x, y = series(key)
        loss_axis.plot(x, y, marker="." if key == "eval_loss" else None, label=label)
    x, y = series("eval_perplexity")
    ppl_axis.plot(x, y, marker=".", color="tab:orange")
    loss_axis.set(xlabel=x_label, ylabel="nats / token", title="loss")
    ppl_axis.set(xlabel=x_label, ylabel="perplexity", title="eval perplexity", yscale="log")
    loss_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
