"""Preference tuning (DPO) end to end: recipe -> preference pairs -> the fine-tuned policy (full or LoRA) and its
frozen reference -> TRL's `DPOTrainer` with lmpipe's reliability callbacks -> metrics, loss.png, card, push.

TRL does the training: the DPO losses, the reference (a frozen copy of the policy; with LoRA the same model with
its adapters disabled, or a frozen copy of an adapter the policy already has), `precompute_ref_log_probs`. lmpipe
adds what TRL lacks: pairs tokenised apart at an exact prompt/answer boundary (`data.preference`), log-probabilities
from only the scored positions a chunk at a time (`chunked_loss`; TRL's fused head scores every position on a
machine without Triton, in large float32 tiles), the run's lifecycle (`run.session`) and the callbacks that make it
resumable, finite and stoppable.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import DPOTrainer

from lmpipe.config.recipe import Recipe
from lmpipe.data.chat import chat_format, resolve_chat_template
from lmpipe.data.mixture import format_shares, parse_sources
from lmpipe.data.preference import PAIR_COLUMNS, PREFERENCE_COLUMN_KEYS, PreferenceData, prepare_preference_data
from lmpipe.errors import LmpipeError
from lmpipe.loss.install import install_chunked_log_probs
from lmpipe.model.build import build_model, check_sequence_length, model_positions
from lmpipe.model.lora import MERGED_DIR, base_model_of, is_adapter_directory, load_adapter, lora_config, save_merged
from lmpipe.model.tokenizer import load_tokenizer
from lmpipe.run.checkpoints import resume_checkpoint
from lmpipe.run.hub import CheckpointPusher, HubTarget, push_run
from lmpipe.run.session import run_session
from lmpipe.training.callbacks import reliability_callbacks
from lmpipe.training.host_memory import keep_freed_host_memory
from lmpipe.training.loop import train_and_evaluate, write_run_outputs
from lmpipe.training.pair_eval import PairWeightedSums, first_pairs, local_gathers, real_pairs
from lmpipe.training.plot import plot_preference_history
from lmpipe.training.trainer import RecipeOptimization, without_trainer_push

# (metrics.json key, DPOTrainer's evaluation key): the final evaluation of a preference run.
EVALUATION_KEYS = (
    ("eval_loss", "eval_loss"),
    ("eval_reward_accuracy", "eval_rewards/accuracies"),
    ("eval_reward_margin", "eval_rewards/margins"),
    ("eval_reward_chosen", "eval_rewards/chosen"),
    ("eval_reward_rejected", "eval_rewards/rejected"),
    ("eval_logps_chosen", "eval_logps/chosen"),
    ("eval_logps_rejected", "eval_logps/rejected"),
)


class PreferenceTrainer(RecipeOptimization, DPOTrainer):
    """TRL's DPOTrainer with the recipe's optimizer and schedule (`RecipeOptimization`), on pairs lmpipe has
    tokenised (`data.preference`); with `chunked_log_probs`, the policy's
    and the reference's log-probabilities come from lmpipe's chunked linear + log-softmax
    (`loss.install.install_chunked_log_probs`) instead of TRL's fused LM head. Its evaluation is exact
    (`training.pair_eval`): every `eval_*` statistic is weighted by pairs (answer tokens for TRL's token
    statistics) over the whole eval set and all ranks."""

    def __init__(self, *args, chunked_log_probs: bool = True, chunk_tokens: int | None = None, **kwargs):
        self.chunked_log_probs, self.chunk_tokens = chunked_log_probs, chunk_tokens  # read by the precompute
        super().__init__(*args, **kwargs)
        self._install_log_probs()

    def _install_log_probs(self) -> None:
        if self.chunked_log_probs:
            for model in (self.model, self.ref_model):
                if model is not None:
                    install_chunked_log_probs(getattr(model, "module", model), self.chunk_tokens)

    def _precompute_ref_logps(self, *args, **kwargs):
        """TRL precomputes the reference log-probabilities inside its __init__: the chunked ones are installed
        first."""
        self._install_log_probs()
        return super()._precompute_ref_logps(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """The pairs arrive as prompt_ids / chosen_ids / rejected_ids: TRL's own tokenising of prompt + answer
        joined would move the boundary where tokens merge across it."""
        return dataset

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        """The Trainer's loop over the eval batches, then the pair-weighted statistics over it in place of its
        `eval_loss` (each rank's last-batch loss repeated, pairs accelerate repeated included) and TRL's."""
        self.eval_sums = PairWeightedSums()
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        means = self.eval_sums.means(self.accelerator)
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in means.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """TRL's step on this rank's real pairs only (one repeated pair when it has none: the forward still runs on
        every rank), its batch means taken back to sums: TRL keeps only means of batches gathered over ranks."""
        local = inputs["input_ids"].shape[0] // 2
        pairs = real_pairs(local, self.accelerator)
        inputs = first_pairs(inputs, max(pairs, 1))
        with local_gathers(self.accelerator):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        means = {key: values[-1] for key, values in self._metrics["eval"].items()}
        self._metrics["eval"].clear()  # TRL's `log` would average its batch means over ours
        self.eval_sums.add(loss.item(), means, inputs, pairs)
        return loss, logits, labels

    def create_model_card(self, *args, **kwargs) -> None:
        """lmpipe writes the run's card when it finishes (`run.card`); TRL would write its own at every save."""


def check_dpo(recipe: Recipe) -> str:
    """DPO's own checks from the recipe and the model's config, before any data; returns the model directory whose
    config says the positions (an adapter's base model)."""
    model, data, lora = recipe.model, recipe.data, recipe.lora
    if not model.model_name_or_path:
        raise LmpipeError("model_name_or_path is required: a fine-tuned run directory (a model or a LoRA adapter)")
    if model.chunked_loss and recipe.training.use_weighting:
        raise LmpipeError("use_weighting needs TRL's fused LM head (log_sum_sq_probs): set chunked_loss: false")
    if data.datasets:
        parse_sources(data.datasets, PREFERENCE_COLUMN_KEYS)
        chosen = [key for key in ("train_file", "validation_file", "dataset_name") if getattr(data, key)]
        if chosen:
            raise LmpipeError(f"datasets: lists the sources; remove {' / '.join(chosen)} (or the datasets list)")
    if recipe.training.zero_shot_tasks:
        raise LmpipeError("zero_shot_tasks: lmpipe dpo does not score them; evaluate the run with lmpipe evaluate")
    adapter = is_adapter_directory(model.model_name_or_path)
    if adapter and recipe.training.optimizer == "muon":
        raise LmpipeError(
            f"{model.model_name_or_path} holds a LoRA adapter: optimizer: muon trains whole weight matrices, not "
            "adapters: use optimizer: adamw"
        )
    if adapter and lora.use_lora:
        raise LmpipeError(
            f"{model.model_name_or_path} holds a LoRA adapter: DPO trains that adapter on; remove use_lora "
            "(or start from the run's merged model)"
        )
    if lora.merge_lora and not (lora.use_lora or adapter):
        raise LmpipeError("merge_lora: true needs use_lora: true or an adapter to start from")
    config_dir = base_model_of(model.model_name_or_path) if adapter else model.model_name_or_path
    check_sequence_length(model_positions(dataclasses.replace(model, model_name_or_path=config_dir)),
                          data.max_length, "max_length")
    return config_dir


def prepare_dpo_data(recipe: Recipe, training) -> tuple[PreTrainedTokenizerBase, PreferenceData]:
    """The tokenizer (with the chat template when a source holds conversations) and the tokenised pairs: training,
    the loss check and `show-data` all read their pairs from here."""
    model_args, data = recipe.model, recipe.data
    tokenizer = load_tokenizer(recipe.tokenizer, model_args.model_name_or_path, None, model_args.trust_remote_code)

    @cache
    def run_chat_format():  # saved with the run's tokenizer, so generate --chat uses it
        tokenizer.chat_template = resolve_chat_template(data.chat_template, tokenizer)
        return chat_format(tokenizer, tokenizer.chat_template)

    with training.main_process_first(desc="tokenising preference pairs"):
        pairs = prepare_preference_data(data, tokenizer, run_chat_format, training.data_seed or training.seed)
    return tokenizer, pairs


def build_policy(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, config_dir: str
                 ) -> tuple[PreTrainedModel, LoraConfig | None]:
    """The policy and, for new adapters, their config (TRL then computes the reference with them disabled). A LoRA
    run's adapter is loaded trainable on its base model (TRL keeps a frozen copy of it as the reference)."""
    model_args, lora = recipe.model, recipe.lora
    if is_adapter_directory(model_args.model_name_or_path):
        base = build_model(dataclasses.replace(model_args, model_name_or_path=config_dir), tokenizer,
                           recipe.data.max_length)
        return load_adapter(base, model_args.model_name_or_path), None
    model = build_model(model_args, tokenizer, recipe.data.max_length)
    return model, lora_config(model, lora) if lora.use_lora else None


def load_reference(recipe: Recipe, name_or_path: str) -> PreTrainedModel:
    """A reference model other than the policy as loaded (the loss check of a finished DPO run: the model it started
    from)."""
    model_args = dataclasses.replace(recipe.model, model_name_or_path=name_or_path)
    tokenizer = load_tokenizer(recipe.tokenizer, name_or_path, None, model_args.trust_remote_code)
    return build_model(model_args, tokenizer, recipe.data.max_length).eval()


def build_dpo_trainer(
    recipe: Recipe, training, config_dir: str, reference: PreTrainedModel | None = None
) -> tuple[PreferenceTrainer, PreferenceData]:
    """Tokenizer, pairs, policy and the DPOTrainer with lmpipe's callbacks: training and the loss check use this.
    Without `reference`, TRL makes it from the policy."""
    tokenizer, data = prepare_dpo_data(recipe, training)
    model, peft_config = build_policy(recipe, tokenizer, config_dir)
    if getattr(training, "host_memory_reuse", False) and training.device.type == "cpu":
        keep_freed_host_memory()
    try:
        trainer = PreferenceTrainer(
            model=model,
            ref_model=reference,
            args=without_trainer_push(training),
            train_dataset=data.train.select_columns(PAIR_COLUMNS),
            eval_dataset=data.validation.select_columns(PAIR_COLUMNS),
            processing_class=tokenizer,
            peft_config=peft_config,
            chunked_log_probs=recipe.model.chunked_loss,
            chunk_tokens=recipe.model.chunked_loss_tokens,
        )
    except (ValueError, NotImplementedError) as e:  # TRL's checks of combined DPO keys
        raise LmpipeError(f"dpo: {str(e).strip().splitlines()[0]}") from None
    for callback in reliability_callbacks():
        trainer.add_callback(callback)
    return trainer, data


def dpo(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe (`run.session`'s steps), then push when it says `push_to_hub`; returns the metrics written to
    `metrics.json`."""
    return run_session(
        recipe, check=lambda: check_dpo(recipe), train=lambda config_dir, hub: train_dpo(recipe, config_dir, hub)
    )


def preference_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The final evaluation's DPO loss and reward statistics of the held-out pairs, each a mean over pairs."""
    return {key: evaluation[source] for key, source in EVALUATION_KEYS if source in evaluation}


def train_dpo(recipe: Recipe, config_dir: str, hub: HubTarget | None) -> dict[str, Any]:
    """The run itself, with output_dir held and checked: pairs, policy, DPOTrainer, training, outputs, push."""
    training, lora = recipe.training, recipe.lora
    set_seed(training.seed)
    trainer, data = build_dpo_trainer(recipe, training, config_dir)
    if data.mixture and trainer.is_world_process_zero():
        print(format_shares(data.mixture), flush=True)
    if hub:
        trainer.add_callback(CheckpointPusher(hub))
    metrics = train_and_evaluate(trainer, recipe, resume_checkpoint(recipe, training), preference_evaluation)
    model = trainer.model
    if data.mixture:
        metrics["mixture"] = data.mixture
    metrics.update(
        beta=training.beta,
        loss_type=training.loss_type,
        examples={name: dataclasses.asdict(counts) for name, counts in data.counts.items()},
        train_pairs=len(data.train),
        validation_pairs=len(data.validation),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    if trainer.is_world_process_zero() and lora.merge_lora:
        save_merged(trainer.model, trainer.processing_class, training.output_dir)
        metrics["merged_model_dir"] = str(Path(training.output_dir) / MERGED_DIR)
    write_run_outputs(trainer, metrics, plot=plot_preference_history)
    if hub:
        push_run(training.output_dir, hub)
    return metrics
