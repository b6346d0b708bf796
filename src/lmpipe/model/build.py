"""GPT2LMHeadModel from a recipe's sizes or from pretrained safetensors weights, checked against its tokenizer."""

from __future__ import annotations

import logging
import math

from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipe.config.arguments import ModelArguments
from lmpipe.errors import LmpipeError, cannot_load
from lmpipe.model.checks import check_finite_weights, check_model_files, check_vocab

logger = logging.getLogger(__name__)

# transformers derives loss_type from the class name; "GPT2LMHeadModel" maps to None, and then the Trainer
# counts num_items_in_batch over unshifted labels, reporting (L-1)/L of the true loss. Name it explicitly.
CAUSAL_LM_LOSS = "ForCausalLM"


def padded_vocab_size(tokenizer_size: int, multiple: int) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of `multiple` (never sampled: see generate)."""
    return int(math.ceil(tokenizer_size / multiple) * multiple)


def build_model(args: ModelArguments, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    """A new GPT-2 sized by the recipe, or the pretrained one; `loss_type` set, cache off for training."""
    if args.model_name_or_path:
        model = load_pretrained(args.model_name_or_path, args.trust_remote_code, args.attn_implementation)
        check_vocab(model, tokenizer, args.resize_embeddings, args.model_name_or_path)
    else:
        config = GPT2Config(
            vocab_size=padded_vocab_size(len(tokenizer), args.pad_vocab_to_multiple_of),
            n_positions=args.n_positions,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            activation_function=args.activation_function,
            resid_pdrop=args.dropout,
            embd_pdrop=args.dropout,
            attn_pdrop=args.dropout,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config._attn_implementation = args.attn_implementation
        model = GPT2LMHeadModel(config)
    check_sequence_length(model.config.n_positions, block_size, "block_size")
    model.loss_type = CAUSAL_LM_LOSS
    model.config.use_cache = False
    return model


def model_positions(args: ModelArguments) -> int:
    """The model's n_positions from the recipe or the pretrained config alone, so a bad length fails before data;
    a from-scratch shape is checked here too."""
    if not args.model_name_or_path:
        if args.n_embd % args.n_head:
            raise LmpipeError(f"n_embd={args.n_embd} must be divisible by n_head={args.n_head}")
        return args.n_positions
    check_model_files(args.model_name_or_path, ("config", "weights"))
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise cannot_load(args.model_name_or_path, "a model config", e) from None
    return config.n_positions


def check_sequence_length(n_positions: int, length: int, key: str) -> None:
    """Position ids past n_positions would index outside the position embeddings."""
    if length > n_positions:
        raise LmpipeError(f"{key}={length} exceeds the model's n_positions={n_positions}")


def load_pretrained(name_or_path: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Weights from safetensors only (a repository that ships only pickles is refused, never unpickled), whole and
    finite."""
    check_model_files(name_or_path, ("config", "weights"))
    if trust_remote_code:
        logger.warning("trust_remote_code is on: code shipped with %s will run on this machine", name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupted file
        raise cannot_load(name_or_path, "a safetensors model", e) from None
    check_finite_weights(model, name_or_path)
    return model
