"""The Trainer we run: exact token-weighted evaluation, resume from the last checkpoint, metrics and plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from lmpipe.errors import LmpipeError
from lmpipe.metrics import NllStatistics, compute_exact_metrics
from lmpipe.recipe import Recipe, write_resolved_recipe

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


def build_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    data_collator,
    tokenizer: PreTrainedTokenizerBase,
    byte_lengths: np.ndarray,
) -> ExactEvalTrainer:
    """The Trainer for every lmpipe run: exact evaluation wired in."""
    return ExactEvalTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        preprocess_logits_for_metrics=NllStatistics(byte_lengths),
        compute_metrics=compute_exact_metrics,
    )


def final_evaluation(trainer: ExactEvalTrainer) -> dict[str, Any]:
    """The evaluation logged at the last step when there was one, else a new one (never evaluate twice)."""
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        return evaluations[-1]
    return trainer.evaluate()


def train_and_evaluate(trainer: ExactEvalTrainer, recipe: Recipe) -> dict[str, Any]:
    """Resume if a checkpoint exists, train, evaluate exactly, save the model; returns the run's metrics."""
    output_dir = trainer.args.output_dir
    resume_from = trainer.args.resume_from_checkpoint or last_checkpoint(output_dir)
    if trainer.is_world_process_zero():
        write_resolved_recipe(recipe, output_dir)
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    evaluation = final_evaluation(trainer)
    trainer.save_model(output_dir)
    runtime = train_output.metrics["train_runtime"]
    return {
        "eval_loss": evaluation["eval_loss"],
        "perplexity": evaluation["eval_perplexity"],
        "eval_tokens": evaluation["eval_tokens"],
        "bits_per_byte": evaluation["eval_bits_per_byte"],
        "trainer_batch_mean_eval_loss": evaluation["eval_batch_mean_loss"],
        "train_loss": train_output.training_loss,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "train_steps": trainer.state.global_step,
        "train_runtime_s": runtime,
        "train_tokens_per_second": trainer.state.num_input_tokens_seen / runtime,
        "resumed_from": resume_from,
    }


def write_run_outputs(trainer: ExactEvalTrainer, metrics: dict[str, Any]) -> None:
    """The loss plot, then `metrics.json` last: its presence marks a finished run (rank 0 only)."""
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    plot_history(trainer.state.log_history, output_dir / PLOT_NAME)
    write_json_atomically(metrics, output_dir / METRICS_NAME)
