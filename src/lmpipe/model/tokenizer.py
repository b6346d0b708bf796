"""GPT-2 byte-level BPE tokenizers: loaded from the Hub or a directory, built from vocab+merges, or trained."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from lmpipe.config.arguments import TokenizerArguments
from lmpipe.errors import LmpipeError, cannot_load, not_found
from lmpipe.model.checks import check_model_files, check_tokenizer_vocabulary

EOS_TOKEN = "<|endoftext|>"

logger = logging.getLogger(__name__)


def plain_text_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with no special token recognised: a quoted `<|endoftext|>` or chat marker is text.

    transformers' `split_special_tokens`; with a Rust tokenizer the backend is called directly (the same ids
    without the offsets, masks and Python wrapping that `tokenizer(...)` builds; speed: benchmarks/README.md).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def gpt2_tokenizer_from_files(vocab_file: str, merges_file: str) -> GPT2Tokenizer:
    """GPT-2's tokenizer from `vocab.json`+`merges.txt` (or OpenAI's identical `encoder.json`+`vocab.bpe`)."""
    for path in (vocab_file, merges_file):
        if not Path(path).is_file():
            raise not_found(path, "tokenizer file")
    try:
        vocab, merges = models.BPE.read_file(vocab_file, merges_file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise LmpipeError(f"{vocab_file} / {merges_file}: not a BPE vocab/merges pair ({e})") from None
    if EOS_TOKEN not in vocab:
        raise LmpipeError(f"{vocab_file}: has no {EOS_TOKEN} token")
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> GPT2Tokenizer:
    """A byte-level BPE trained on `texts`, with GPT-2's pre-tokenizer and `<|endoftext|>` as its only special."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.model.save(tmp)
        return gpt2_tokenizer_from_files(vocab_file, merges_file)


def load_saved_tokenizer(checkpoint: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a checkpoint (the Trainer saves it in each): a resumed run that trained its own
    continues with it rather than training it again."""
    check_model_files(checkpoint, ("tokenizer",))
    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise LmpipeError(f"{checkpoint}: cannot load its tokenizer ({str(e).strip().splitlines()[0]})") from None


def check_tokenizer_arguments(args: TokenizerArguments, model_name_or_path: str | None = None) -> None:
    """A trained tokenizer excludes a named one and a pretrained model, and a named directory must hold a
    tokenizer; checked before any data is read."""
    named = [key for key in ("tokenizer_name_or_path", "vocab_file", "merges_file") if getattr(args, key)]
    if args.train_tokenizer and named:
        raise LmpipeError(
            f"train_tokenizer: true and {' / '.join(named)} both choose the tokenizer; "
            "set train_tokenizer: false to use the named one"
        )
    if args.train_tokenizer and model_name_or_path:
        raise LmpipeError(
            f"train_tokenizer: true makes a vocabulary that {model_name_or_path} was not trained with; "
            "add --train_tokenizer false (the model's own tokenizer is used)"
        )
    named_directory = args.tokenizer_name_or_path or model_name_or_path
    if not (args.train_tokenizer or args.vocab_file or args.merges_file) and named_directory:
        check_model_files(named_directory, ("tokenizer",))


def load_tokenizer(
    args: TokenizerArguments,
    model_name_or_path: str | None = None,
    training_texts: Iterable[str] | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer; it must have an EOS. No pad token is added: batches that pad say so themselves."""
    if args.train_tokenizer:
        if training_texts is None:
            raise LmpipeError("train_tokenizer: true needs training text")
        tokenizer = train_bpe_tokenizer(training_texts, args.tokenizer_vocab_size)
    elif args.vocab_file or args.merges_file:
        if not (args.vocab_file and args.merges_file):
            raise LmpipeError("vocab_file and merges_file go together: set both")
        tokenizer = gpt2_tokenizer_from_files(args.vocab_file, args.merges_file)
    elif args.tokenizer_name_or_path or model_name_or_path:
        name = args.tokenizer_name_or_path or model_name_or_path
        if trust_remote_code:
            logger.warning("trust_remote_code is on: tokenizer code shipped with %s will run on this machine", name)
        check_model_files(name, ("tokenizer",))
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise cannot_load(name, "a tokenizer", e) from None
        check_tokenizer_vocabulary(tokenizer, name)
    else:
        raise LmpipeError(
            "no tokenizer: set tokenizer_name_or_path, vocab_file + merges_file, or train_tokenizer: true"
        )
    if tokenizer.eos_token_id is None:
        raise LmpipeError(f"tokenizer {tokenizer.name_or_path or ''} has no EOS token")
    return tokenizer
