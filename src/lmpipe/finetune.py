"""QA fine-tuning end to end: recipe -> QA rows -> pretrained GPT-2 (full or LoRA) -> Trainer -> EM / F1 -> metrics."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments, set_seed

from lmpipe.config.arguments import LoraArguments, ModelArguments, QAArguments
from lmpipe.config.recipe import Recipe
from lmpipe.data.chat import (
    ChatFormat,
    chat_format,
    check_messages_column,
    resolve_chat_template,
    tokenize_conversations,
)
from lmpipe.data.collate import padded_collator, qa_collator, real_token_fraction
from lmpipe.data.mixture import format_shares, parse_sources, prepare_mixture
from lmpipe.data.qa import TRAINING_COLUMNS, QACounts, check_qa_columns, hold_out, prompt_template, tokenize_qa
from lmpipe.data.sources import load_corpus
from lmpipe.errors import LmpipeError
from lmpipe.generate import GenerationSettings, generate_from_ids
from lmpipe.loss.install import install_chunked_loss
from lmpipe.loss.reference import IGNORE_INDEX
from lmpipe.model.build import build_model, check_sequence_length, model_positions
from lmpipe.model.lora import MERGED_DIR, save_merged, wrap_lora
from lmpipe.model.tokenizer import load_tokenizer
from lmpipe.run.checkpoints import resume_checkpoint
from lmpipe.run.hub import CheckpointPusher, HubTarget, push_run
from lmpipe.run.session import run_session
from lmpipe.training.exact_eval import token_byte_lengths
from lmpipe.training.loop import train_and_evaluate, write_run_outputs
from lmpipe.training.qa_scores import score_predictions
from lmpipe.training.trainer import ExactEvalTrainer, TokenWeightedLossTrainer, build_trainer
from lmpipe.training.zero_shot_tasks import check_zero_shot_tasks

PREDICTIONS_NAME = "predictions.jsonl"


@dataclass
class QAData:
    """Tokenised train/validation rows (with their prompt text and accepted answers) and the row counts of each
    split (of each source's splits in a mixture)."""

    train: Dataset
    validation: Dataset
    counts: dict[str, QACounts]
    mixture: dict[str, dict[str, float]] | None = None  # realised shares per source of a `datasets:` mixture


def check_lengths_fit(model: ModelArguments, qa: QAArguments) -> None:
    """Training rows and prompt + generated answer must fit the model's positions; checked before any data is read."""
    positions = model_positions(model)
    check_sequence_length(positions, qa.max_length, "max_length")
    if qa.generation_max_new_tokens >= positions:
        raise LmpipeError(
            f"generation_max_new_tokens={qa.generation_max_new_tokens} leaves no room for a prompt in the model's "
            f"n_positions={positions}"
        )


def check_finetune_arguments(model: ModelArguments, qa: QAArguments, lora: LoraArguments) -> str | None:
    """Fine-tuning's own checks from the recipe and the model's config, before any data (the keys' ranges are
    `config.rules`', checked by `run.session.check_run`); returns the prompt template
    (None for conversations: their chat template needs the tokenizer)."""
    if not model.model_name_or_path:
        raise LmpipeError("model_name_or_path is required: a pretrained model directory or Hub id")
    if qa.datasets:
        parse_sources(qa.datasets)  # a malformed entry fails before the model is read
        chosen = [key for key in ("train_file", "validation_file", "dataset_name") if getattr(qa, key)]
        if chosen:
            raise LmpipeError(f"datasets: lists the sources; remove {' / '.join(chosen)} (or the datasets list)")
    if lora.merge_lora and not lora.use_lora:
        raise LmpipeError("merge_lora: true needs use_lora: true")
    check_lengths_fit(model, qa)
    return None if qa.messages_column else prompt_template(qa)


def prepare_qa_data(
    qa: QAArguments, tokenizer: PreTrainedTokenizerBase, training: TrainingArguments, template: str | ChatFormat
) -> QAData:
    """Load, check, tokenise each file (so errors name its rows), then hold out validation if there is none.

    `template` is the prompt template of QA pairs, or the ChatFormat of conversations (`messages_column`)."""
    if qa.datasets:
        with training.main_process_first(desc="tokenising the mixture"):
            chat = template if qa.messages_column else None
            mixture = prepare_mixture(qa, tokenizer, chat, training.data_seed or training.seed)
        return QAData(mixture.train, mixture.validation, mixture.counts, mixture.shares)
    source = qa.train_file or qa.dataset_name or "data"
    corpus = load_corpus(qa.dataset_name, qa.dataset_config_name, qa.train_file, qa.validation_file)
    if qa.messages_column:
        check_messages_column(corpus, qa.messages_column, source)
        tokenize = tokenize_conversations
    else:
        corpus = corpus.flatten()
        check_qa_columns(corpus, qa, source)
        tokenize = tokenize_qa
    encoded, counts = {}, {}
    with training.main_process_first(desc="tokenising examples"):
        for name, split in corpus.items():
            split_source = qa.validation_file if name == "validation" and qa.validation_file else source
            encoded[name], counts[name] = tokenize(split, tokenizer, qa, template, split_source)
    if "validation" not in encoded:  # held out of the train file: each split counted apart
        encoded, counts = hold_out(encoded["train"], len(corpus["train"]), qa.validation_split_percentage, source)
    return QAData(encoded["train"], encoded["validation"], counts)


def evaluate_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Dataset,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers to the prompts the model was trained on, scored against every accepted answer.

    The prompts are the rows' own prompt ids (the -100 labels), not their text re-tokenised: a prompt cut from the
    left by id may not survive decode + encode. They are cut further from the left if the answer needs the room.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False, seed=seed)
    limit = model.config.n_positions - max_new_tokens
    lengths = [prompt_length(labels) for labels in examples["labels"]]
    prompt_ids = [ids[:length][-limit:] for ids, length in zip(examples["input_ids"], lengths)]
    predictions = generate_from_ids(model, tokenizer, prompt_ids, settings, batch_size=batch_size)
    prompts = [  # the text shown in predictions.jsonl
        text if length <= limit else tokenizer.decode(ids)
        for text, length, ids in zip(examples["prompt"], lengths, prompt_ids)
    ]
    scores = score_predictions(predictions, examples["answers"])
    rows = [
        {"question": q, "prompt": p, "prediction": prediction, "answers": a, "em": em, "f1": f1}
        for q, p, prediction, a, em, f1 in zip(
            examples["question"], prompts, predictions, examples["answers"],
            scores["per_example_exact_match"], scores["per_example_f1"],
        )
    ]
    return {"exact_match": scores["exact_match"], "f1": scores["f1"]}, rows


def prompt_length(labels: list[int]) -> int:
    """A QA row's prompt is everything before its first scored label."""
    return next(position for position, label in enumerate(labels) if label != IGNORE_INDEX)


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def initial_evaluation(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The evaluation before the first step (recipe `eval_on_start: true`), to compare with the final one."""
    row = next((row for row in log_history if "eval_loss" in row and row["step"] == 0), None)
    return {"initial_eval_loss": row["eval_loss"], "initial_perplexity": row["eval_perplexity"]} if row else {}


def prepare_finetune_data(
    recipe: Recipe, training: TrainingArguments, template: str | None
) -> tuple[PreTrainedTokenizerBase, QAData]:
    """The tokenizer and the tokenised rows a fine-tuning recipe trains on (no model): training, the loss check
    and `show-data` all read their examples from here. Conversations get their chat template first."""
    model_args, qa = recipe.model, recipe.data
    tokenizer = load_tokenizer(recipe.tokenizer, model_args.model_name_or_path, None, model_args.trust_remote_code)
    if qa.messages_column:  # saved with the run's tokenizer, so generate --chat and a later fine-tune use it
        tokenizer.chat_template = resolve_chat_template(qa.chat_template, tokenizer)
        template = chat_format(tokenizer, tokenizer.chat_template)
    return tokenizer, prepare_qa_data(qa, tokenizer, training, template)


def build_qa_trainer(
    recipe: Recipe, training: TrainingArguments, template: str | None
) -> tuple[ExactEvalTrainer, PreTrainedTokenizerBase, QAData]:
    """Tokenizer, QA rows, the pretrained model (LoRA-wrapped when asked) and its Trainer: fine-tuning and the
    loss check train on exactly this."""
    model_args, qa, lora = recipe.model, recipe.data, recipe.lora
    tokenizer, data = prepare_finetune_data(recipe, training, template)
    model = build_model(model_args, tokenizer, qa.max_length)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    if lora.use_lora:
        model = wrap_lora(model, lora)
    install_chunked_loss(model, model_args.chunked_loss, model_args.chunked_loss_tokens)
    trainer = build_trainer(
        model,
        training,
        data.train.select_columns(TRAINING_COLUMNS),
        data.validation.select_columns(TRAINING_COLUMNS),
        qa_collator(tokenizer, qa.batching),
        tokenizer,
        byte_lengths,
        eval_data_collator=padded_collator(tokenizer),
        trainer_class=TokenWeightedLossTrainer,
        context_length=qa.max_length,
    )
    return trainer, tokenizer, data


def check_finetune(recipe: Recipe) -> str | None:
    """`check_finetune_arguments`, and the zero-shot tasks and their rows; returns the prompt template."""
    check_zero_shot_tasks(recipe.training)
    return check_finetune_arguments(recipe.model, recipe.data, recipe.lora)


def finetune_qa(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe (`run.session`'s steps), then push when it says `push_to_hub`; returns the metrics written to
    `metrics.json` (EM / F1 on the main process only)."""
    return run_session(
        recipe,
        check=lambda: check_finetune(recipe),
        train=lambda template, hub: train_finetune(recipe, template, hub),
    )


def train_finetune(recipe: Recipe, template: str | None, hub: HubTarget | None) -> dict[str, Any]:
    """The run itself, with output_dir held and checked: rows, model, Trainer, training, EM / F1, outputs, push."""
    qa, lora, training = recipe.data, recipe.lora, recipe.training
    set_seed(training.seed)
    trainer, tokenizer, data = build_qa_trainer(recipe, training, template)
    if data.mixture and trainer.is_world_process_zero():
        print(format_shares(data.mixture), flush=True)
    model = trainer.model
    if hub:
        trainer.add_callback(CheckpointPusher(hub))
    metrics = train_and_evaluate(trainer, recipe, resume_checkpoint(recipe, training))
    if data.mixture:
        metrics["mixture"] = data.mixture
    metrics.update(
        initial_evaluation(trainer.state.log_history),
        batching=qa.batching,
        real_token_fraction=real_token_fraction(  # one epoch of row indices, as the Trainer's sampler batches them
            [len(ids) for ids in data.train["input_ids"]], trainer.get_train_dataloader().batch_sampler, qa.batching
        ),
        examples={name: dataclasses.asdict(counts) for name, counts in data.counts.items()},
        train_examples=len(data.train),
        validation_examples=len(data.validation),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    if trainer.is_world_process_zero():
        output_dir = Path(training.output_dir)
        if lora.merge_lora:
            model = save_merged(trainer.model, tokenizer, training.output_dir)
            metrics["merged_model_dir"] = str(output_dir / MERGED_DIR)
    answers_scored = not qa.messages_column and training.final_evaluation  # conversations: perplexity only
    if trainer.is_world_process_zero() and answers_scored:
        qa_scores, predictions = evaluate_qa(
            model, tokenizer, data.validation, qa.generation_max_new_tokens, training.per_device_eval_batch_size,
            training.seed,
        )
        write_jsonl(predictions, output_dir / PREDICTIONS_NAME)
        metrics.update(qa_scores, predictions_file=str(output_dir / PREDICTIONS_NAME))
    write_run_outputs(trainer, metrics)
    if hub:
        push_run(training.output_dir, hub)
    return metrics
