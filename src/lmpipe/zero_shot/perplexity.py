"""`lmpipe perplexity`: the rolling-window perplexity of a saved model on a text file, as one JSON line.

The zero-shot `perplexity` task under its older flags (`--validation_file`, `--block_size`, `--stride`): every
document is scored on its own after the prefix token, every token once, with the most context a window allows
(lm-evaluation-harness's `loglikelihood_rolling`); bits per byte divide by the text's own UTF-8 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmpipe.config.rules import check_values
from lmpipe.errors import LmpipeError, cannot_load
from lmpipe.model.checks import check_model_files
from lmpipe.model.finite import non_finite_metrics
from lmpipe.run.checkpoints import verified_model_dir
from lmpipe.zero_shot.run import ZeroShotArguments, evaluate_zero_shot


@dataclass
class EvaluateArguments:
    """Flags of `pipelines/perplexity.py` / `lmpipe perplexity`."""

    # Optional here only so that a recipe file may hold them (it is parsed alone first); evaluate_file requires them.
    model_name_or_path: str | None = field(default=None, metadata={"help": "Saved model directory or Hub id."})
    validation_file: str | None = field(default=None, metadata={"help": "Text to score: .txt/.json/.csv/..."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per window (default: n_positions)."})
    stride: int | None = field(
        default=None, metadata={"help": "Tokens each window after the first predicts (default: block_size)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a .txt file splits into documents.", "choices": ["line", "paragraph", "document"]},
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})


def window_sizes(block_size: int | None, stride: int | None, n_positions: int) -> tuple[int, int]:
    """(block size, stride) with the defaults filled in; a stride over the block would skip tokens."""
    block_size = n_positions if block_size is None else block_size
    stride = block_size if stride is None else stride
    if not 2 <= block_size <= n_positions:
        raise LmpipeError(f"block_size={block_size} must be between 2 and the model's n_positions={n_positions}")
    if not 1 <= stride <= block_size:
        raise LmpipeError(f"stride={stride} must be between 1 and block_size={block_size}")
    return block_size, stride


def evaluate_file(args: EvaluateArguments) -> dict[str, float | int]:
    """Loss per token, token/word/byte perplexity and bits per byte of the model on the file's documents."""
    from transformers import AutoConfig

    for name in ("model_name_or_path", "validation_file"):
        if not getattr(args, name):
            raise LmpipeError(f"--{name} is required")
    check_values(args)
    model = verified_model_dir(args.model_name_or_path)  # its newest checkpoint that passes, when it fails
    check_model_files(model, ("config", "weights", "tokenizer"))
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise cannot_load(model, "a model config", e) from None
    block_size, stride = window_sizes(args.block_size, args.stride, config.n_positions)
    zero_shot = ZeroShotArguments(
        model_name_or_path=model, task="perplexity", data=args.validation_file,
        text_column=args.text_column, sample_by=args.sample_by, batch_size=args.batch_size, max_length=block_size,
        stride=stride,
    )
    metrics = evaluate_zero_shot(zero_shot, show_progress=False)["metrics"]
    result = {
        "eval_loss": metrics["nll_per_token"],
        "perplexity": metrics["token_perplexity"],
        "eval_tokens": metrics["tokens"],
        "bits_per_byte": metrics["bits_per_byte"],
        "word_perplexity": metrics["word_perplexity"],
        "byte_perplexity": metrics["byte_perplexity"],
        "block_size": block_size,
        "stride": stride,
    }
    not_finite = non_finite_metrics(result)
    if not_finite:  # JSON has no number for NaN or inf: fail rather than print an invalid line
        raise LmpipeError(
            f"{args.model_name_or_path}: {', '.join(not_finite)} on {args.validation_file} is not finite (NaN or inf)"
        )
    return result
