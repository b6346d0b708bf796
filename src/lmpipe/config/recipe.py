"""Recipes: one flat YAML per run, parsed into dataclasses plus `TrainingArguments`; CLI flags override.

Every YAML key becomes a `--key value` flag placed before the command-line flags, so YAML values are
type-checked by the same `HfArgumentParser` as flags and a later flag wins. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.activations import ACT2FN

from lmpipe.errors import LmpipeError
from lmpipe.config.rules import check_nulls, check_recipe_values
from lmpipe.run.files import RESOLVED_RECIPE_NAME, write_text_atomically

# Keys that must never come from a recipe: the token is read from the environment / login cache only.
FORBIDDEN_KEYS = {"hub_token"}
# The key naming a recipe's command; written first in every run's recipe.yaml so the run says what it was.
TASK_KEY = "task"
# Keys another task takes, refused with the reason rather than a "did you mean" guess.
NOT_FOR_TASK = {("qa", "streaming"): "only pretraining streams; QA and conversation data are read in memory"}
# A value such as -1e-3 or -.5 after a flag: argparse would take it for an option.
NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf$|nan$)", re.IGNORECASE)


@dataclass
class ModelArguments:
    """The network: built from scratch from these sizes, or loaded from `model_name_or_path`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model directory or Hub id; unset builds a new GPT-2."}
    )
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks (from scratch)."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size (from scratch)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (from scratch)."})
    n_positions: int = field(default=256, metadata={"help": "Maximum sequence length (from scratch)."})
    dropout: float = field(default=0.0, metadata={"help": "Residual, embedding and attention dropout."})
    pad_vocab_to_multiple_of: int = field(
        default=64, metadata={"help": "Round the embedding rows up to a multiple of this (matmul-friendly)."}
    )
    resize_embeddings: bool = field(
        default=False, metadata={"help": "Allow growing a pretrained model's embeddings to fit the tokenizer."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager."})
    activation_function: str = field(
        default="gelu_pytorch_tanh",
        metadata={
            "help": "MLP activation (from scratch). GPT-2's tanh GELU in one kernel; gelu_new: the same in 6 ops.",
            "choices": sorted(ACT2FN),
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a Hub model."})
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Loss from the hidden states a chunk of tokens at a time, never the full logits; false: the model's own."},
    )
    chunked_loss_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens per loss chunk (default: 128 MiB of float32 logits, less on small machines)."},
    )


@dataclass
class TokenizerArguments:
    """Where the byte-level BPE comes from: a Hub id/directory, vocab+merges files, or trained on the corpus."""

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or Hub id (default: model_name_or_path)."}
    )
    vocab_file: str | None = field(default=None, metadata={"help": "GPT-2 vocab.json or encoder.json."})
    merges_file: str | None = field(default=None, metadata={"help": "GPT-2 merges.txt or vocab.bpe."})
    train_tokenizer: bool = field(default=False, metadata={"help": "Train a byte-level BPE on the train split."})
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of a trained BPE."})


@dataclass
class DataArguments:
    """The corpus: a Hub dataset, local files, or `builtin:pydoc` (Python's own documentation text)."""

    dataset_name: str | None = field(
        default="builtin:pydoc", metadata={"help": "Hub dataset id, or builtin:pydoc (no download)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.json/.jsonl/.csv/.parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a .txt file splits into documents.", "choices": ["line", "paragraph", "document"]},
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Without a validation split: the last this-% of documents."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    max_train_documents: int | None = field(default=None, metadata={"help": "Keep only the first N documents."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for map()."})
    streaming: bool = field(
        default=False, metadata={"help": "Read, tokenise and pack the train corpus lazily (needs max_steps)."}
    )
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture instead of train_file/dataset_name: a list of {path, weight, split, config, "
            "text_column} (JSON per source on the command line); weight > 1 repeats documents, < 1 subsamples them; "
            "with streaming, the weights are the sources' probabilities (interleaved, normalised)."
        },
    )
    streaming_validation_documents: int = field(
        default=1000,
        metadata={
            "help": "Streaming, no validation split: hold out the stream's first N documents (of each source of a "
            "mixture)."
        },
    )


@dataclass
class RunTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the output-directory guard that transformers 5 dropped (run_clm users know the flag)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace another run (a different recipe.yaml) in output_dir; the same recipe always resumes."},
    )
    final_evaluation: bool = field(
        default=True,
        metadata={"help": "Evaluate the validation split exactly when training ends; false: no evaluation at all "
                          "(metrics.json then has training figures only), like run_clm without --do_eval."},
    )
    host_memory_reuse: bool = field(
        default=True,
        metadata={"help": "Training on a CPU under Linux: freed memory stays in the process for the next step "
                          "instead of going back to the OS (no page faults on every step's large tensors; RSS stays "
                          "at its peak, a higher one with chunked_loss: false); false: the C library's defaults."},
    )


PRETRAIN_ARGUMENTS = (ModelArguments, TokenizerArguments, DataArguments, RunTrainingArguments)


@dataclass
class QAArguments:
    """Question-answer pairs for fine-tuning: where they are, how a prompt is written, how rows are batched."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .json/.jsonl/.csv/.parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(
        default="answer", metadata={"help": "Column holding the answer or a list of accepted answers."}
    )
    context_column: str | None = field(default=None, metadata={"help": "Optional column holding a passage."})
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Python format string with {question} (and {context}); default 'Question: {question}\\nAnswer:'."},
    )
    answer_prefix: str = field(default=" ", metadata={"help": "Text put before the answer (GPT-2 BPE: a space)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example: prompt (left-truncated) + answer + EOS."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Without a validation split: the last this-% of examples."}
    )
    batching: str = field(
        default="padded",
        metadata={"help": "padded: dynamic padding per batch; packed: padding-free rows.", "choices": ["padded", "packed"]},
    )
    generation_max_new_tokens: int = field(default=16, metadata={"help": "Greedy answer length for exact match / F1."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for map()."})
    messages_column: str | None = field(
        default=None,
        metadata={"help": "Column of conversations ([{role, content}, ...]) to learn instead of question/answer."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template (text or a .jinja file); default: the tokenizer's, else lmpipe's plain one."},
    )
    learn_assistant_turns: str = field(
        default="all",
        metadata={"help": "Assistant turns whose content + end marker are learned.", "choices": ["all", "last"]},
    )
    max_dropped_share: float = field(
        default=0.1,
        metadata={"help": "Stop when more than this share of a file's conversations has no learned token left."},
    )
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture instead of train_file/dataset_name: a list of {path, weight, split, config, "
            "and column keys} (JSON per source on the command line); weight > 1 repeats rows, < 1 subsamples them."
        },
    )


@dataclass
class LoraArguments:
    """Low-rank adapters through peft instead of full fine-tuning."""

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters; the base weights stay frozen."})
    lora_r: int = field(default=8, metadata={"help": "Adapter rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Adapter scale numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc"],
        metadata={"help": "Module names to adapt (GPT-2: attention c_attn/c_proj, MLP c_fc/c_proj)."},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into a plain model under OUTPUT_DIR/merged."}
    )


FINETUNE_QA_ARGUMENTS = (ModelArguments, TokenizerArguments, QAArguments, LoraArguments, RunTrainingArguments)
TASKS = {"pretrain": PRETRAIN_ARGUMENTS, "qa": FINETUNE_QA_ARGUMENTS}


@dataclass
class Recipe:
    """Parsed arguments in the order of the dataclass types, and the keys the user set explicitly."""

    arguments: tuple
    explicit: dict[str, Any]
    source: str | None
    task: str | None = None  # a key of TASKS for training recipes; None for commands that train nothing

    def resolved(self) -> dict[str, Any]:
        """The task, then the explicitly set keys with their final typed values: a recipe that reruns this run."""
        values = {}
        for args in self.arguments:
            for f in dataclasses.fields(args):
                if f.name in self.explicit:
                    values[f.name] = _plain(getattr(args, f.name))
        if values.get("report_to") == []:  # TrainingArguments parses "none" into []: write what parses back to it
            values["report_to"] = "none"
        keys = {k: values[k] for k in self.explicit if k in values}
        return {TASK_KEY: self.task, **keys} if self.task else keys


def _plain(value: Any) -> Any:
    """YAML-safe form of a parsed value (enums by value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _RecipeParser(HfArgumentParser):
    """HfArgumentParser whose argparse errors raise one-line LmpipeErrors instead of printing usage."""

    def error(self, message: str):  # argparse calls this on a bad flag or value
        raise LmpipeError(message)


def _to_flags(mapping: dict[str, Any]) -> list[str]:
    """`--key=value` (one token, so a value starting with '-' is never read as a flag); lists as separate values."""
    flags = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{key}={str(value).lower()}")
        elif isinstance(value, (list, tuple)):  # a mapping in a list (a `datasets:` source) travels as JSON
            flags += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        elif isinstance(value, dict):
            flags.append(f"--{key}={json.dumps(value)}")
        else:
            flags.append(f"--{key}={value}")
    return flags


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-3` -> `--learning_rate=-1e-3`: argparse reads only plain `-1` or `-.5` as values."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if NEGATIVE_NUMBER.match(arg) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def _closest(key: str, known: set[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _why_unknown(key: str, known: set[str], task: str | None, prefix: str = "") -> str:
    reason = NOT_FOR_TASK.get((task, key))
    return f": {reason}" if reason else _closest(key, known, prefix)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe with both is ambiguous."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmpipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmpipeError(f"{path}: cannot read recipe ({e})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LmpipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmpipeError(f"{path}: a recipe is a flat mapping of key: value, got {type(data).__name__}")
    return data


def _flag_keys(argv: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


# lmpipe's defaults where TrainingArguments' own do not suit a language-model run; any recipe or flag wins.
TRAINING_DEFAULTS = {
    "report_to": "tensorboard",
    "include_num_input_tokens_seen": True,
    "logging_steps": 10,
    "dataloader_pin_memory": torch.cuda.is_available(),
}


class HelpRequested(Exception):
    """`-h` / `--help` among the arguments: the command prints `str(self)` (every key it takes) and exits 0."""


def parse_recipe(
    argv: list[str],
    types=PRETRAIN_ARGUMENTS,
    default_recipe: str | None = None,
    defaults: dict[str, Any] = TRAINING_DEFAULTS,
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Recipe:
    """Parse `[RECIPE.yaml] [--key value ...]` into the dataclasses `types`; raises LmpipeError on any mistake.

    A recipe's `task` key, when present, must be the task of `types` (a pretraining recipe given to fine-tuning
    is refused); commands that train nothing have no task and take no such key.
    `adjust` rewrites the recipe file's keys before the flags apply (e.g. a finished run's recipe, loaded back).
    """
    if "-h" in argv or "--help" in argv:
        from lmpipe.config.help import recipe_help

        raise HelpRequested(recipe_help(types, defaults))
    parser = _RecipeParser(types)
    known = {action.dest for action in parser._actions} - {"help"}
    source = argv[0] if argv and not argv[0].startswith("-") else default_recipe
    cli = _join_negative_values(argv[1:] if argv and not argv[0].startswith("-") else list(argv))
    recipe = _read_yaml(source) if source else {}
    task = task_of(types)
    if task is not None and TASK_KEY in recipe:
        if recipe[TASK_KEY] != task:
            raise LmpipeError(f"{source}: a '{recipe.pop(TASK_KEY)}' recipe, not '{task}'; pretraining recipes run with `lmpipe pretrain`, qa ones with `lmpipe finetune-qa`")
        del recipe[TASK_KEY]
    if adjust is not None:
        recipe = adjust(recipe)
    for key in recipe:
        if key in FORBIDDEN_KEYS:
            raise LmpipeError(f"{source}: '{key}' may not be set in a recipe; use HF_TOKEN or `hf auth login`")
        if key not in known:
            raise LmpipeError(f"{source}: unknown key '{key}'{_why_unknown(key, known, task)}")
    for key in _flag_keys(cli):
        if key in FORBIDDEN_KEYS:
            raise LmpipeError(f"--{key} may not be given; use HF_TOKEN or `hf auth login`")
        if key not in known and not (key.startswith("no_") and key[3:] in known):
            raise LmpipeError(f"unknown option --{key}{_why_unknown(key, known, task, '--')}")
    recipe_flags = _to_flags({**defaults, **recipe})
    try:  # with the flags first: a flag may satisfy a check the recipe alone fails (bf16 needs --use_cpu on CPU)
        arguments = _parse(parser, recipe_flags + cli)
    except LmpipeError as error:
        try:  # the recipe alone failing the same way is the recipe's fault: name the file
            _parse(parser, recipe_flags)
        except LmpipeError as recipe_error:
            if str(recipe_error) == str(error):
                raise LmpipeError(f"{source}: {error}") from None
        raise
    flag_keys = [k[3:] if k.startswith("no_") else k for k in _flag_keys(cli)]
    check_nulls(recipe, arguments, source)
    check_recipe_values(arguments, set(recipe) - set(flag_keys), source)
    explicit = dict.fromkeys([*recipe, *flag_keys])
    return Recipe(arguments=arguments, explicit=explicit, source=source, task=task)


def task_of(types: tuple[type, ...]) -> str | None:
    """The training task whose dataclasses `types` holds (the loss check adds its own), else None."""
    return next((task for task, groups in TASKS.items() if set(groups) <= set(types)), None)


def recipe_task(path: str) -> str | None:
    """The `task` a recipe file names (run directories' recipe.yaml always do), or None."""
    task = _read_yaml(path).get(TASK_KEY)
    if task is not None and task not in TASKS:
        raise LmpipeError(f"{path}: {TASK_KEY} must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def _parse(parser: _RecipeParser, flags: list[str]) -> tuple:
    try:
        *arguments, rest = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    except (ValueError, TypeError) as e:  # raised by a dataclass __post_init__, e.g. TrainingArguments
        raise LmpipeError(str(e).strip().splitlines()[0]) from None
    if rest:
        raise LmpipeError(f"unexpected arguments: {' '.join(rest)}")
    return tuple(arguments)


def write_resolved_recipe(recipe: Recipe, output_dir: str) -> Path:
    """Write `recipe.yaml` atomically so a later run can compare or rerun it."""
    path = Path(output_dir) / RESOLVED_RECIPE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(recipe.resolved(), sort_keys=False))
    return path
