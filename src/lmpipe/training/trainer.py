"""The Trainer we run: exact token-weighted evaluation, resume from the last checkpoint, metrics and plots."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from lmpipe.training.callbacks import TrainingAlreadyDone, mean_train_loss, reliability_callbacks, restore_signal_handlers
from lmpipe.run.card import write_model_card
from lmpipe.run.checkpoints import TRAINER_STATE, identity_changes, resume_checkpoint
from lmpipe.errors import LmpipeError
from lmpipe.model.finite import non_finite_metrics
from lmpipe.training.flops import ModelFlopsMeter, device_peak_flops, flops_per_token
from lmpipe.training.host_memory import keep_freed_host_memory
from lmpipe.training.exact_eval import NllStatistics, compute_exact_metrics
from lmpipe.config.recipe import Recipe, write_resolved_recipe
from lmpipe.run.files import METRICS_NAME, PLOT_NAME, write_text_atomically


class ExactEvalTrainer(Trainer):
    """A Trainer whose `eval_loss` is total NLL / total scored tokens over all ranks.

    The stock `eval_loss` is a mean of per-batch means; it is kept, renamed `eval_batch_mean_loss`, for comparison.
    Needs `preprocess_logits_for_metrics=NllStatistics(...)` and `compute_metrics=compute_exact_metrics`.
    `eval_data_collator` (default: the training one) must keep one row per example: `gather_for_metrics` drops
    the samples duplicated across ranks by row, so a padding-free collator (a whole batch in one row) cannot be used.
    """

    def __init__(self, *args, eval_data_collator=None, flops_meter: ModelFlopsMeter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator or self.data_collator
        self.flops_meter = flops_meter

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs also carry the model TFLOP/s (and MFU on a known GPU) since the previous one."""
        if self.flops_meter is not None:
            self.flops_meter.add_to_log(logs, self.state.num_input_tokens_seen, self.args.world_size)
        super().log(logs, *args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        training_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

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


def plot_history(
    log_history: list[dict[str, Any]], path: Path, title: str, baseline_loss: float | None = None
) -> None:
    """Train/eval loss and eval perplexity against tokens seen (steps when tokens were not tracked), with the
    unigram baseline's loss dashed when there is one: the model must be far below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    def series(key):
        rows = [row for row in log_history if key in row and math.isfinite(row[key])]
        return [row.get("num_input_tokens_seen", row.get("step", 0)) for row in rows], [row[key] for row in rows]

    x_label = "tokens seen" if any("num_input_tokens_seen" in row for row in log_history) else "step"
    figure, (loss_axis, ppl_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss (exact)")):
        x, y = series(key)
        loss_axis.plot(x, y, marker="." if key == "eval_loss" else None, label=label)
    if baseline_loss is not None:
        loss_axis.axhline(baseline_loss, linestyle="--", color="gray", label="unigram baseline")
    x, y = series("eval_perplexity")
    ppl_axis.plot(x, y, marker=".", color="tab:orange")
    loss_axis.set(xlabel=x_label, ylabel="nats / token", title="loss")
    ppl_axis.set(xlabel=x_label, ylabel="perplexity", title="eval perplexity", yscale="log")
    for axis in (loss_axis, ppl_axis):
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M: plain integers run into each other
    loss_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def without_trainer_push(args: TrainingArguments) -> TrainingArguments:
    """The Trainer's copy of the arguments with its own Hub push off: lmpipe.run.hub pushes once the run is finished."""
    if not args.push_to_hub:
        return args
    local = copy.copy(args)
    local.push_to_hub = False
    return local


def build_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    data_collator,
    tokenizer: PreTrainedTokenizerBase,
    byte_lengths: np.ndarray,
    eval_data_collator=None,
    trainer_class: type[ExactEvalTrainer] = ExactEvalTrainer,
    context_length: int | None = None,
) -> ExactEvalTrainer:
    """The Trainer for every lmpipe run: exact evaluation and the reliability callbacks wired in; with
    `context_length` (block size / max length) its logs and metrics carry model FLOP/s. On a CPU (and
    `host_memory_reuse`) freed host memory is kept for the next step from here on."""
    if getattr(args, "host_memory_reuse", False) and args.device.type == "cpu":  # plain TrainingArguments: off
        keep_freed_host_memory()
    meter = None
    if context_length is not None:
        peak = device_peak_flops(args.device, args.bf16 or args.fp16)
        meter = ModelFlopsMeter(flops_per_token(model, context_length), peak)
    trainer = trainer_class(
        eval_data_collator=eval_data_collator,
        flops_meter=meter,
        model=model,
        args=without_trainer_push(args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        preprocess_logits_for_metrics=NllStatistics(byte_lengths),
        compute_metrics=compute_exact_metrics,
    )
    for callback in reliability_callbacks():  # after the progress bar's, so it is closed before they raise
        trainer.add_callback(callback)
    return trainer


def final_evaluation(trainer: ExactEvalTrainer) -> dict[str, Any] | None:
    """The evaluation logged at the last step when there was one, else a new one (never evaluate twice); None
    when the recipe says `final_evaluation: false` and the last step logged none."""
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        return evaluations[-1]
    return trainer.evaluate() if trainer.args.final_evaluation else None


def tokens_seen_at(checkpoint: str | None) -> int:
    """Training tokens a resumed run had already seen: `train_runtime` counts only this session's time."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    return state.get("num_input_tokens_seen", 0)


def train_and_evaluate(trainer: ExactEvalTrainer, recipe: Recipe) -> dict[str, Any]:
    """Resume if a checkpoint exists, train, evaluate exactly, save the model; returns the run's metrics."""
    output_dir = trainer.args.output_dir
    resume_from = resume_checkpoint(recipe, trainer.args)
    if trainer.is_world_process_zero():
        (Path(output_dir) / METRICS_NAME).unlink(missing_ok=True)  # not finished while it trains on
        write_resolved_recipe(recipe, output_dir)
    tokens_before = tokens_seen_at(resume_from)  # read now: save_total_limit may delete that checkpoint
    try:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
        runtime, session_loss = train_output.metrics["train_runtime"], train_output.training_loss
    except TrainingAlreadyDone:  # resumed from the last step: evaluate and save what it holds
        runtime, session_loss = 0.0, None
    finally:
        restore_signal_handlers(trainer.callback_handler.callbacks)
    evaluation = final_evaluation(trainer)
    trainer.save_model(output_dir)
    session_tokens = trainer.state.num_input_tokens_seen - tokens_before
    flops = {}
    if trainer.flops_meter is not None and session_tokens > 0 and runtime:
        flops = {
            "model_flops_per_token": trainer.flops_meter.flops_per_token,
            **trainer.flops_meter.rates(session_tokens, runtime, trainer.args.world_size),
        }
    evaluated = {} if evaluation is None else {
        "eval_loss": evaluation["eval_loss"],
        "perplexity": evaluation["eval_perplexity"],
        "eval_tokens": evaluation["eval_tokens"],
        "bits_per_byte": evaluation["eval_bits_per_byte"],
        "trainer_batch_mean_eval_loss": evaluation["eval_batch_mean_loss"],
    }
    metrics = {
        **evaluated,
        "train_loss": mean_train_loss(trainer.state.log_history) or session_loss,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "train_steps": trainer.state.global_step,
        "train_epochs": trainer.state.epoch,
        "train_runtime_s": runtime,
        "train_tokens_per_second": session_tokens / runtime if runtime else 0.0,
        **flops,
        "resumed_from": resume_from,
    }
    not_finite = non_finite_metrics(metrics)
    if not_finite:  # metrics.json would hold NaN, which is not JSON: the run does not count as finished
        raise LmpipeError(f"{output_dir}: the final {', '.join(not_finite)} is not finite (NaN or inf); no metrics.json")
    return metrics


def finished_run(recipe: Recipe, args: TrainingArguments) -> dict[str, Any] | None:
    """The metrics of the finished run in `output_dir` when this command asks it for no more training, else None.

    Rerunning a finished run's command must not train: resuming from its last checkpoint, the Trainer would take
    one more step than `max_steps` (it checks the count only after a step). A larger `max_steps` or
    `num_train_epochs`, a named `resume_from_checkpoint` or another run's recipe is not finished here.
    """
    path = Path(args.output_dir) / METRICS_NAME
    if args.resume_from_checkpoint or not path.is_file() or identity_changes(recipe, args.output_dir):
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if args.max_steps > 0:
        finished = metrics.get("train_steps", 0) >= args.max_steps
    else:
        finished = metrics.get("train_epochs", 0) >= args.num_train_epochs - 1e-6  # the Trainer's float epoch
    if not finished:
        return None
    if args.process_index == 0:
        print(
            f"{args.output_dir} holds this run, finished after {metrics['train_steps']} steps: nothing to train."
            f" Its results are in {path}; raise --max_steps to train longer",
            file=sys.stderr,
        )
    return metrics


def write_run_outputs(trainer: ExactEvalTrainer, metrics: dict[str, Any]) -> None:
    """The loss plot and model card, then `metrics.json` last: its presence marks a finished run (rank 0 only)."""
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    baseline = math.log(metrics["unigram_perplexity"]) if "unigram_perplexity" in metrics else None
    title = f"{output_dir.absolute().name}: {parameters / 1e6:.2f}M parameters"
    plot_history(trainer.state.log_history, output_dir / PLOT_NAME, title, baseline)
    write_model_card(output_dir, metrics)
    write_text_atomically(output_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
