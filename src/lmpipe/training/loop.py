"""Training a built Trainer and what follows it: resume, train, the final exact evaluation, the saved model, the
run's metrics, and its output files (`loss.png`, the model card, then `metrics.json`, which marks it finished)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmpipe.config.recipe import Recipe
from lmpipe.errors import LmpipeError
from lmpipe.loss.train_loss import mean_train_loss
from lmpipe.model.finite import non_finite_metrics
from lmpipe.run.card import write_model_card
from lmpipe.run.checkpoints import TRAINER_STATE, resume_checkpoint
from lmpipe.run.files import METRICS_NAME, PLOT_NAME, write_resolved_recipe, write_text_atomically
from lmpipe.run.signals import restore_signal_handlers
from lmpipe.training.callbacks import TrainingAlreadyDone
from lmpipe.training.plot import plot_history
from lmpipe.training.trainer import ExactEvalTrainer


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


def language_model_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The metrics of an exact causal-LM evaluation (`ExactEvalTrainer`)."""
    return {
        "eval_loss": evaluation["eval_loss"],
        "perplexity": evaluation["eval_perplexity"],
        "eval_tokens": evaluation["eval_tokens"],
        "bits_per_byte": evaluation["eval_bits_per_byte"],
        "trainer_batch_mean_eval_loss": evaluation["eval_batch_mean_loss"],
    }


def train_and_evaluate(
    trainer: ExactEvalTrainer,
    recipe: Recipe,
    evaluation_metrics: Callable[[dict[str, Any]], dict[str, Any]] = language_model_evaluation,
) -> dict[str, Any]:
    """Resume if a checkpoint exists, train, evaluate, save the model; returns the run's metrics (the final
    evaluation's through `evaluation_metrics`)."""
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
    if getattr(trainer, "flops_meter", None) is not None and session_tokens > 0 and runtime:
        flops = {
            "model_flops_per_token": trainer.flops_meter.flops_per_token,
            **trainer.flops_meter.rates(session_tokens, runtime, trainer.args.world_size),
        }
    evaluated = {} if evaluation is None else evaluation_metrics(evaluation)
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
        raise LmpipeError(
            f"{output_dir}: the final {', '.join(not_finite)} is not finite (NaN or inf); no metrics.json"
        )
    return metrics


def write_run_outputs(trainer: ExactEvalTrainer, metrics: dict[str, Any], plot=plot_history) -> None:
    """The loss plot (`plot`: `training.plot`'s language-model or preference plot) and model card, then
    `metrics.json` last: its presence marks a finished run (rank 0 only)."""
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    baseline = math.log(metrics["unigram_perplexity"]) if "unigram_perplexity" in metrics else None
    title = f"{output_dir.absolute().name}: {parameters / 1e6:.2f}M parameters"
    plot(trainer.state.log_history, output_dir / PLOT_NAME, title, baseline)
    write_model_card(output_dir, metrics)
    write_text_atomically(output_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
