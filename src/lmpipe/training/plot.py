"""`loss.png`: train/eval loss and eval perplexity against tokens seen (a preference run: loss, reward margin and
reward accuracy against steps), written at the end of every run; with `zero_shot_tasks`, a third panel: each
task's accuracy at every evaluation, its chance level dashed."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

ACCURACY_KEY = r"eval_zero_shot/[^/]+/acc"


def plot_history(
    log_history: list[dict[str, Any]], path: Path, title: str, baseline_loss: float | None = None
) -> None:
    """Train/eval loss and eval perplexity against tokens seen (steps when tokens were not tracked), with the
    unigram baseline's loss dashed when there is one: the model must be far below it; and the zero-shot accuracies
    (`eval_zero_shot/NAME/acc`) when the run scored any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    def series(key):
        rows = [row for row in log_history if key in row and math.isfinite(row[key])]
        return [row.get("num_input_tokens_seen", row.get("step", 0)) for row in rows], [row[key] for row in rows]

    x_label = "tokens seen" if any("num_input_tokens_seen" in row for row in log_history) else "step"
    accuracies = sorted({key for row in log_history for key in row if re.fullmatch(ACCURACY_KEY, key)})
    figure, axes = plt.subplots(1, 3 if accuracies else 2, figsize=(15 if accuracies else 10, 4))
    loss_axis, ppl_axis = axes[:2]
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss (exact)")):
        x, y = series(key)
        loss_axis.plot(x, y, marker="." if key == "eval_loss" else None, label=label)
    if baseline_loss is not None:
        loss_axis.axhline(baseline_loss, linestyle="--", color="gray", label="unigram baseline")
    x, y = series("eval_perplexity")
    ppl_axis.plot(x, y, marker=".", color="tab:orange")
    loss_axis.set(xlabel=x_label, ylabel="nats / token", title="loss")
    ppl_axis.set(xlabel=x_label, ylabel="perplexity", title="eval perplexity", yscale="log")
    if accuracies:
        accuracy_axis = axes[2]
        for key in accuracies:
            name = key.split("/")[1]
            line = accuracy_axis.plot(*series(key), marker=".", label=name)[0]
            chance = series(key.removesuffix("/acc") + "/chance")[1]
            if chance:
                accuracy_axis.axhline(chance[-1], linestyle="--", color=line.get_color())
        accuracy_axis.set(xlabel=x_label, ylabel="accuracy", title="zero-shot accuracy (chance dashed)")
        accuracy_axis.legend()
    for axis in axes:
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M: plain integers run into each other
    loss_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# (log key, eval log key, title, y label) of each panel of a preference run's plot; the keys are TRL's DPOTrainer's.
PREFERENCE_PANELS = (
    ("loss", "eval_loss", "DPO loss", "loss"),
    ("rewards/margins", "eval_rewards/margins", "reward margin", "chosen - rejected reward"),
    ("rewards/accuracies", "eval_rewards/accuracies", "reward accuracy", "share of pairs with chosen ahead"),
)


def plot_preference_history(
    log_history: list[dict[str, Any]], path: Path, title: str, baseline_loss: float | None = None
) -> None:
    """Train and eval DPO loss, reward margin and reward accuracy against optimizer steps (`baseline_loss`: unused,
    the signature of `plot_history`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PREFERENCE_PANELS), figsize=(14, 4))
    for axis, (train_key, eval_key, name, y_label) in zip(axes, PREFERENCE_PANELS):
        for key, label in ((train_key, "train"), (eval_key, "eval")):
            rows = [row for row in log_history if key in row and math.isfinite(row[key])]
            marker = "." if label == "eval" else None
            axis.plot([row["step"] for row in rows], [row[key] for row in rows], marker=marker, label=label)
        axis.set(xlabel="step", ylabel=y_label, title=name)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
