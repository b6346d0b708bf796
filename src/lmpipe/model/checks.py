"""A saved model loads whole or not at all: the checks every loader (pretrain, finetune-qa, generate, perplexity,
check-loss) runs, each failing in one line that names the directory and what is wrong.

transformers fills gaps silently: a directory without tokenizer files gives a one-token GPT-2 tokenizer, and
NaN weights load without a word. Local directories are checked file by file before loading; a Hub id is left to
the Hub loaders, whose errors name what is missing, and every loaded model and tokenizer is checked after.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.errors import LmpipeError
from lmpipe.model.finite import first_non_finite

# What a part of a model directory needs: (what to call it when missing, any of these file sets present).
PARTS = {
    "config": ("config.json", [("config.json",), ("adapter_config.json",)]),
    "tokenizer": ("tokenizer files (tokenizer.json, or vocab.json + merges.txt)",
                  [("tokenizer.json",), ("vocab.json", "merges.txt")]),
}


def check_model_files(name_or_path: str, parts: tuple[str, ...]) -> None:
    """A local directory must hold each of `parts` ("config", "weights", "tokenizer"); a Hub id passes here."""
    directory = Path(name_or_path)
    if not directory.is_dir():
        if directory.exists():
            raise LmpipeError(f"{name_or_path}: a file, not a model directory")
        return
    names = {p.name for p in directory.iterdir()}
    missing = []
    for part in parts:
        if part == "weights":
            if not any(name.endswith(".safetensors") for name in names):
                pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
                refused = f"; {', '.join(pickles)} is a pickle and is never loaded" if pickles else ""
                missing.append(f"weights (*.safetensors{refused})")
            continue
        what, alternatives = PARTS[part]
        if not any(all(file in names for file in files) for files in alternatives):
            missing.append(what)
    if missing:
        raise LmpipeError(f"{name_or_path}: not a whole model directory, missing {' and '.join(missing)}")


def check_tokenizer_vocabulary(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """A tokenizer with nothing but special tokens would turn every text into unknown or end-of-text tokens."""
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise LmpipeError(f"{name}: the tokenizer has no vocabulary ({len(tokenizer)} token(s), all special)")


def check_finite_weights(model: PreTrainedModel, name: str) -> None:
    """NaN or inf weights (a diverged run saved by another tool) make every loss and generation meaningless."""
    bad = first_non_finite(model.named_parameters())
    if bad:
        raise LmpipeError(f"{name}: weight {bad} holds NaN or inf; the model cannot be used")


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, allow_resize: bool, name: str) -> None:
    """A tokenizer larger than the embeddings would index past them: resize only when the recipe allows it."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    if not allow_resize:
        raise LmpipeError(
            f"{name}: tokenizer has {len(tokenizer)} tokens but the model has {rows} embedding rows; "
            "use the model's tokenizer or set resize_embeddings: true"
        )
    model.resize_token_embeddings(len(tokenizer))
