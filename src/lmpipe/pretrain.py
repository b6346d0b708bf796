"""Pretraining end to end: recipe -> corpus -> tokenizer -> packed blocks -> GPT-2 -> Trainer -> metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from lmpipe.data.collate import collate_blocks
from lmpipe.data.packing import blocks_as_array, flat_token_ids, pack_blocks, tokenize_documents
from lmpipe.errors import LmpipeError
from lmpipe.data.sources import check_text_column, load_corpus, split_validation
from lmpipe.metrics import NllStatistics, compute_exact_metrics, token_byte_lengths, unigram_perplexity
from lmpipe.model import build_model
from lmpipe.recipe import DataArguments, ModelArguments, Recipe, TokenizerArguments, write_resolved_recipe
from lmpipe.tokenizer import load_tokenizer
from lmpipe.train import (
    METRICS_NAME,
    PLOT_NAME,
    ExactEvalTrainer,
    check_training_arguments,
    last_checkpoint,
    plot_history,
    write_json_atomically,
)


@dataclass
class PackedCorpus:
    """Train/validation blocks and the tokenizer that made them, plus the flat train ids for the baseline."""

    tokenizer: PreTrainedTokenizerBase
    train: Dataset
    validation: Dataset
    train_ids: Any


def prepare_corpus(
    data: DataArguments, tokenizer_args: TokenizerArguments, model: ModelArguments, training: TrainingArguments
) -> PackedCorpus:
    """Load, split, tokenise and pack; the tokenizer is trained on the train split when the recipe asks."""
    source = data.train_file or data.dataset_name or "data"
    corpus = load_corpus(data.dataset_name, data.dataset_config_name, data.train_file, data.validation_file, data.sample_by)
    if data.max_train_documents:
        corpus["train"] = corpus["train"].select(range(min(data.max_train_documents, len(corpus["train"]))))
    corpus = split_validation(corpus, data.validation_split_percentage, source)
    check_text_column(corpus, data.text_column, source)
    texts = corpus["train"][data.text_column] if tokenizer_args.train_tokenizer else None
    tokenizer = load_tokenizer(tokenizer_args, model.model_name_or_path, texts, model.trust_remote_code)
    with training.main_process_first(desc="tokenising and packing"):
        tokenized = {
            name: tokenize_documents(split, tokenizer, data.text_column, data.preprocessing_num_workers)
            for name, split in corpus.items()
        }
        for name, split in tokenized.items():
            if len(flat_token_ids(split)) == 0:
                raise LmpipeError(f"{source} ({name}): no tokens after tokenisation")
        packed = {name: pack_blocks(split, data.block_size, name) for name, split in tokenized.items()}
    return PackedCorpus(tokenizer, packed["train"], packed["validation"], flat_token_ids(tokenized["train"]))


def final_evaluation(trainer: ExactEvalTrainer) -> dict[str, Any]:
    """The evaluation logged at the last step when there was one, else a new one (never evaluate twice)."""
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        return evaluations[-1]
    return trainer.evaluate()


def pretrain(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe; returns the metrics written to `metrics.json` in the output directory."""
    model_args, tokenizer_args, data_args, training = recipe.arguments
    check_training_arguments(training)
    if not model_args.model_name_or_path and data_args.block_size > model_args.n_positions:
        raise LmpipeError(f"block_size={data_args.block_size} exceeds n_positions={model_args.n_positions}")
    set_seed(training.seed)
    corpus = prepare_corpus(data_args, tokenizer_args, model_args, training)
    model = build_model(model_args, corpus.tokenizer, data_args.block_size)
    byte_lengths = token_byte_lengths(corpus.tokenizer, model.config.vocab_size)

    output_dir = Path(training.output_dir)
    resume_from = training.resume_from_checkpoint or last_checkpoint(str(output_dir))
    if training.process_index == 0:
        write_resolved_recipe(recipe, str(output_dir))
    trainer = ExactEvalTrainer(
        model=model,
        args=training,
        train_dataset=corpus.train,
        eval_dataset=corpus.validation,
        data_collator=collate_blocks,
        processing_class=corpus.tokenizer,
        preprocess_logits_for_metrics=NllStatistics(byte_lengths),
        compute_metrics=compute_exact_metrics,
    )
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    evaluation = final_evaluation(trainer)
    trainer.save_model(str(output_dir))
    metrics = {
        "eval_loss": evaluation["eval_loss"],
        "perplexity": evaluation["eval_perplexity"],
        "eval_tokens": evaluation["eval_tokens"],
        "bits_per_byte": evaluation["eval_bits_per_byte"],
        "unigram_perplexity": unigram_perplexity(
            corpus.train_ids, blocks_as_array(corpus.validation), len(corpus.tokenizer)
        ),
        "trainer_batch_mean_eval_loss": evaluation["eval_batch_mean_loss"],
        "train_loss": train_output.training_loss,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "train_steps": trainer.state.global_step,
        "train_runtime_s": train_output.metrics["train_runtime"],
        "train_tokens_per_second": trainer.state.num_input_tokens_seen / train_output.metrics["train_runtime"],
        "resumed_from": resume_from,
    }
    if trainer.is_world_process_zero():
        plot_history(trainer.state.log_history, output_dir / PLOT_NAME)
        write_json_atomically(metrics, output_dir / METRICS_NAME)
    return metrics
