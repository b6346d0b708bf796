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
from lmpipe.run.checkpoints import TRAINER_STATE
from lmpipe.run.files import METRICS_NAME, PLOT_NAME, model_files, write_resolved_recipe, write_text_atomically
from lmpipe.run.identity import record_identity
from lmpipe.run.manifest import write_manifest
from lmpipe.run.signals import stops_the_final_evaluation
from lmpipe.training.callbacks import RecordRunOnceLoaded, TrainingAlreadyDone, first_callback, logged_loss_at
from lmpipe.training.plot import plot_history
from lmpipe.training.trainer import ExactEvalTrainer
from lmpipe.training.zero_shot_tasks import zero_shot_metrics


def final_evaluation(trainer: ExactEvalTrainer) -> dict[str, Any] | None:
    """The evaluation logged at the last step when there was one, else a new one (never evaluate twice); None
    when the recipe says `final_evaluation: false` and the last step logged none."""
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        return evaluations[-1]
    return trainer.evaluate() if trainer.args.final_evaluation else None


def save_last_step(trainer: ExactEvalTrainer) -> None:
    """`checkpoint-N` of the last step when the save strategy wrote none (`no`, `best`): the final evaluation was
    stopped, and the rerun resumes there and evaluates instead of training again. `_save_checkpoint` is the
    Trainer's own save of a complete checkpoint (every rank's RNG state included); it has no public name. The
    callbacks' `on_save` follows, as after the Trainer's own saves: `SealCheckpoint` writes its manifest."""
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not (checkpoint / TRAINER_STATE).is_file():  # the Trainer writes it last
        trainer._save_checkpoint(trainer.model, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


def tokens_seen_at(checkpoint: str | None) -> int:
    """Training tokens a resumed run had already seen: `train_runtime` counts only this session's time."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    return state.get("num_input_tokens_seen", 0)


def language_model_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The metrics of an exact causal-LM evaluation (`ExactEvalTrainer`), with any `zero_shot_tasks` scores."""
    metrics = {
        "eval_loss": evaluation["eval_loss"],
        "perplexity": evaluation["eval_perplexity"],
        "eval_tokens": evaluation["eval_tokens"],
        "bits_per_byte": evaluation["eval_bits_per_byte"],
        "trainer_batch_mean_eval_loss": evaluation["eval_batch_mean_loss"],
    }
    if zero_shot_metrics(evaluation):
        metrics["zero_shot"] = zero_shot_metrics(evaluation)
    return metrics


def train_and_evaluate(
    trainer: ExactEvalTrainer,
    recipe: Recipe,
    resume_from: str | None,
    evaluation_metrics: Callable[[dict[str, Any]], dict[str, Any]] = language_model_evaluation,
) -> dict[str, Any]:
    """Resume from `resume_from` (`run.checkpoints.resume_checkpoint`), train, evaluate, save the model and its
    manifest; returns the run's metrics (the final evaluation's through `evaluation_metrics`). `identity.json` and
    `recipe.yaml` are written, and a finished run's metrics.json goes, once the checkpoint has loaded
    (`RecordRunOnceLoaded`, `NotFinishedOnceStarted`)."""
    output_dir = trainer.args.output_dir

    def record() -> None:
        record_identity(recipe, output_dir, resume_from)  # before recipe.yaml: it records what changed since
        write_resolved_recipe(recipe, output_dir)

    first_callback(trainer, RecordRunOnceLoaded(record))
    tokens_before = tokens_seen_at(resume_from)  # read now: save_total_limit may delete that checkpoint
    with stops_the_final_evaluation(trainer.callback_handler.callbacks, lambda: save_last_step(trainer)) as trained:
        try:
            train_output = trainer.train(resume_from_checkpoint=resume_from)
            runtime, session_loss = train_output.metrics["train_runtime"], train_output.training_loss
        except TrainingAlreadyDone:  # resumed from the last step: evaluate and save what it holds
            runtime, session_loss = 0.0, None
        trained()
        evaluation = final_evaluation(trainer)
        trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        step, loss = trainer.state.global_step, logged_loss_at(trainer.state)
        write_manifest(output_dir, sorted(model_files(Path(output_dir))), step, loss)
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
