"""Pretraining end to end: recipe -> corpus -> tokenizer -> packed blocks -> GPT-2 -> Trainer -> metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from lmpipe.data.collate import collate_blocks
from lmpipe.data.packing import blocks_as_array, flat_token_ids, pack_blocks, tokenize_documents
from lmpipe.data.sources import check_text_column, load_corpus, split_validation
from lmpipe.errors import LmpipeError
from lmpipe.metrics import token_byte_lengths, unigram_perplexity
from lmpipe.model import build_model
from lmpipe.recipe import DataArguments, ModelArguments, Recipe, TokenizerArguments
from lmpipe.tokenizer import load_tokenizer
from lmpipe.train import build_trainer, check_training_arguments, train_and_evaluate, write_run_outputs


@dataclass
class PackedCorpus:
    """Train/validation blocks and the tokenizer that made them, plus the flat train ids for the baseline."""

    tokenizer: PreTrainedTokenizerBase
    train: Dataset
    validation: Dataset
    train_ids: np.ndarray


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
    trainer = build_trainer(
        model, training, corpus.train, corpus.validation, collate_blocks, corpus.tokenizer, byte_lengths
    )
    metrics = train_and_evaluate(trainer, recipe)
    baseline = unigram_perplexity(corpus.train_ids, blocks_as_array(corpus.validation), len(corpus.tokenizer))
    metrics = {**metrics, "unigram_perplexity": baseline}
    write_run_outputs(trainer, metrics)
    return metrics
