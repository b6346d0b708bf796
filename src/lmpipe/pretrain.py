"""Pretraining end to end: recipe -> corpus -> tokenizer -> packed blocks -> GPT-2 -> Trainer -> metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from lmpipe.config.arguments import DataArguments, ModelArguments, TokenizerArguments
from lmpipe.config.recipe import Recipe
from lmpipe.data.collate import collate_blocks
from lmpipe.data.mixture import format_shares, mixed_documents, realised_shares
from lmpipe.data.null_rows import check_no_null_text
from lmpipe.data.packing import (
    blocks_as_array,
    blocks_dataset,
    flat_token_ids,
    pack_blocks,
    tokenize_documents,
    whole_blocks,
)
from lmpipe.data.sources import check_text_column, load_corpus, split_validation
from lmpipe.data.stream_mixture import MIXTURE_NAME, StreamMixture, stream_mixture, trained_shares
from lmpipe.data.streaming import PackedStream, check_streaming_arguments, stream_documents, stream_texts
from lmpipe.errors import LmpipeError
from lmpipe.loss.install import install_chunked_loss
from lmpipe.model.build import build_model, check_sequence_length, model_positions
from lmpipe.model.tokenizer import check_tokenizer_arguments, load_tokenizer
from lmpipe.run.distributed import on_main_process
from lmpipe.run.hub import CheckpointPusher, HubTarget, push_run
from lmpipe.run.session import run_session
from lmpipe.training.exact_eval import token_byte_lengths, unigram_perplexity
from lmpipe.training.loop import train_and_evaluate, write_run_outputs
from lmpipe.training.trainer import ExactEvalTrainer, build_trainer


@dataclass
class PackedCorpus:
    """Train/validation blocks and the tokenizer that made them, plus the flat train ids for the baseline."""

    tokenizer: PreTrainedTokenizerBase
    train: Dataset | PackedStream
    validation: Dataset
    train_ids: np.ndarray
    mixture: dict[str, dict[str, float]] | None = None  # realised shares per source of a `datasets:` mixture
    stream_mixture: StreamMixture | None = None  # a streamed mixture: its shares are counted once it has trained


def prepare_corpus(
    data: DataArguments, tokenizer_args: TokenizerArguments, model: ModelArguments, training: TrainingArguments
) -> PackedCorpus:
    """Load, split, tokenise and pack; the tokenizer is trained on the train split when the recipe asks."""
    check_tokenizer_arguments(tokenizer_args, model.model_name_or_path)
    if data.datasets and (data.train_file or data.validation_file):
        raise LmpipeError("datasets: lists the sources; remove train_file / validation_file")
    if data.streaming:
        return prepare_streaming_corpus(data, tokenizer_args, model, training)
    source = "datasets" if data.datasets else data.train_file or data.dataset_name or "data"
    if data.datasets:
        seed = training.data_seed or training.seed
        corpus, sources = mixed_documents(
            data.datasets, data.text_column, data.sample_by, data.validation_split_percentage, seed
        )
    else:
        corpus = load_corpus(
            data.dataset_name, data.dataset_config_name, data.train_file, data.validation_file, data.sample_by
        )
    if data.max_train_documents:
        corpus["train"] = corpus["train"].select(range(min(data.max_train_documents, len(corpus["train"]))))
    check_no_null_text(corpus, data.text_column, {"train": source, "validation": data.validation_file or source})
    corpus = split_validation(corpus, data.validation_split_percentage, source)
    check_text_column(corpus, data.text_column, source)
    texts = corpus["train"][data.text_column] if tokenizer_args.train_tokenizer else None
    tokenizer = on_main_process(
        training, load_tokenizer, tokenizer_args, model.model_name_or_path, texts, model.trust_remote_code
    )
    with training.main_process_first(desc="tokenising and packing"):
        tokenized = {
            name: tokenize_documents(split, tokenizer, data.text_column, data.preprocessing_num_workers)
            for name, split in corpus.items()
        }
        ids = {name: flat_token_ids(split) for name, split in tokenized.items()}  # once per split
        for name, split_ids in ids.items():
            if len(split_ids) == 0:
                raise LmpipeError(f"{source} ({name}): no tokens after tokenisation")
        packed = {
            name: blocks_dataset(whole_blocks(split_ids, data.block_size, name)) for name, split_ids in ids.items()
        }
    mixture = None
    if data.datasets:  # every token of a document (and its EOS) is learned
        lengths = pc.list_value_length(tokenized["train"].data.column("input_ids")).to_pylist()
        mixture = realised_shares(sources, corpus["train"]["source"], lengths)
    return PackedCorpus(tokenizer, packed["train"], packed["validation"], ids["train"], mixture)


# Streaming: the unigram baseline is fitted on the stream's first this-many train tokens, not the whole stream.
UNIGRAM_SAMPLE_TOKENS = 1 << 20


def prepare_streaming_corpus(
    data: DataArguments, tokenizer_args: TokenizerArguments, model: ModelArguments, training: TrainingArguments
) -> PackedCorpus:
    """Train blocks packed lazily from a stream; validation blocks in memory, so evaluation stays exact."""
    check_streaming_arguments(training)
    mixture, files = None, None
    if data.datasets:
        mixture = stream_mixture(data, training.data_seed or training.seed)
        source, files = MIXTURE_NAME, mixture.files
        train_documents, validation_documents = mixture.train, mixture.validation
    else:
        source = data.train_file or data.dataset_name or "data"
        train_documents, validation_documents = stream_documents(data, source)
    texts = stream_texts(train_documents, data.text_column, source, files) if tokenizer_args.train_tokenizer else None
    tokenizer = on_main_process(
        training, load_tokenizer, tokenizer_args, model.model_name_or_path, texts, model.trust_remote_code
    )
    with training.main_process_first(desc="tokenising validation"):
        validation_ids = tokenize_documents(validation_documents, tokenizer, data.text_column)
        validation = pack_blocks(validation_ids, data.block_size, "validation")
    train = PackedStream(train_documents, tokenizer, data.text_column, data.block_size, source, files)
    head_ids = on_main_process(training, train.head_ids, UNIGRAM_SAMPLE_TOKENS)
    return PackedCorpus(tokenizer, train, validation, head_ids, stream_mixture=mixture)


def check_counted_blocks(data: DataArguments, training: TrainingArguments) -> None:
    """A streamed mixture's shares are counted over the blocks the Trainer says it took in, so it must count them."""
    counting = training.include_num_input_tokens_seen
    if data.streaming and data.datasets and counting != "all":  # "non_padding" would skip GPT-2's EOS (its pad)
        raise LmpipeError("datasets: a streamed mixture counts its trained blocks from the Trainer's input tokens; "
                          f"set include_num_input_tokens_seen: true, got {counting!r}")


def trained_blocks(trainer: ExactEvalTrainer, block_size: int) -> int:
    """Blocks all ranks together trained on, earlier sessions of a resumed run included, from the Trainer's count of
    input tokens: exact, a pass's last short batch too (steps x the global batch would not be)."""
    return trainer.state.num_input_tokens_seen // block_size


def build_pretrain_trainer(recipe: Recipe, training: TrainingArguments) -> tuple[ExactEvalTrainer, PackedCorpus]:
    """Corpus, tokenizer, model and Trainer of a pretraining recipe: pretraining and the loss check train on this."""
    model_args, data_args = recipe.model, recipe.data
    corpus = prepare_corpus(data_args, recipe.tokenizer, model_args, training)
    model = build_model(model_args, corpus.tokenizer, data_args.block_size)
    install_chunked_loss(model, model_args.chunked_loss, model_args.chunked_loss_tokens)
    byte_lengths = token_byte_lengths(corpus.tokenizer, model.config.vocab_size)
    trainer = build_trainer(
        model, training, corpus.train, corpus.validation, collate_blocks, corpus.tokenizer, byte_lengths,
        context_length=data_args.block_size,
    )
    return trainer, corpus


def pretrain(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe (`run.session`'s steps), then push when it says `push_to_hub`; returns the metrics written to
    `metrics.json`."""
    return run_session(recipe, check=lambda: check_pretrain(recipe), train=lambda _, hub: train_pretrain(recipe, hub))


def check_pretrain(recipe: Recipe) -> None:
    """Pretraining's own checks before any data: the blocks fit the model, a streamed mixture can count its blocks."""
    check_sequence_length(model_positions(recipe.model), recipe.data.block_size, "block_size")
    check_counted_blocks(recipe.data, recipe.training)


def train_pretrain(recipe: Recipe, hub: HubTarget | None) -> dict[str, Any]:
    """The run itself, with output_dir held and checked: corpus, model, Trainer, training, outputs, push."""
    training = recipe.training
    set_seed(training.seed)
    trainer, corpus = build_pretrain_trainer(recipe, training)
    if corpus.mixture and trainer.is_world_process_zero():
        print(format_shares(corpus.mixture), flush=True)
    if hub:
        trainer.add_callback(CheckpointPusher(hub))
    metrics = train_and_evaluate(trainer, recipe)
    mixture = corpus.mixture
    if corpus.stream_mixture is not None and trainer.is_world_process_zero():  # rank 0 alone read the stream
        data = recipe.data
        blocks = trained_blocks(trainer, data.block_size)
        mixture = trained_shares(corpus.stream_mixture, corpus.tokenizer, data.text_column, data.block_size, blocks)
        print(f"{format_shares(mixture)} (the documents of the {blocks:,} trained blocks)", flush=True)
    baseline = unigram_perplexity(corpus.train_ids, blocks_as_array(corpus.validation), len(corpus.tokenizer))
    metrics = {**metrics, "unigram_perplexity": baseline}
    if mixture:
        metrics["mixture"] = mixture
    write_run_outputs(trainer, metrics)
    if hub:
        push_run(training.output_dir, hub)
    return metrics
