"""`--help`: every recipe key of a command with its type, default and one line, from the dataclass field metadata.

HfArgumentParser's own help prints every TrainingArguments field (over a hundred); here those are summarised by a
pointer to transformers' documentation plus the fields lmpipe's recipes use.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

from transformers import TrainingArguments

TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
# The TrainingArguments fields the shipped recipes set (tests/test_recipe.py keeps this list complete), and the
# few more a run commonly changes.
TRAINING_KEYS_SHOWN = (
    "output_dir", "overwrite_output_dir", "seed", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "optim", "bf16", "use_cpu",
    "eval_strategy", "eval_steps", "eval_on_start", "save_strategy", "save_steps", "save_total_limit",
    "logging_steps", "report_to", "train_sampling_strategy", "dataloader_num_workers", "resume_from_checkpoint",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo",
)


def recipe_help(types: tuple[type, ...], training_defaults: dict[str, Any]) -> str:
    """One section per argument dataclass; `training_defaults` are lmpipe's own defaults for TrainingArguments."""
    sections = []
    for group in types:
        if issubclass(group, TrainingArguments):
            sections.append(_training_section(group, training_defaults))
        else:
            summary = (group.__doc__ or "").strip().splitlines()[0]
            sections.append("\n".join([f"{group.__name__}: {summary}", *map(_describe, dataclasses.fields(group))]))
    return "\n\n".join(sections)


def _training_section(group: type, training_defaults: dict[str, Any]) -> str:
    fields = {f.name: f for f in dataclasses.fields(group)}
    dpo = " and TRL's DPOConfig keys (the DPO ones below)" if hasattr(group, "beta") else ""
    lines = [
        f"TrainingArguments: any field of transformers.TrainingArguments is a key ({TRAINING_ARGUMENTS_DOCS}){dpo};"
        " those lmpipe's recipes use:"
    ]
    lines += [_describe(fields[name], training_defaults) for name in TRAINING_KEYS_SHOWN if name in fields]
    lines += [
        _describe(f, training_defaults) for f in lmpipe_training_fields(group) if f.name not in TRAINING_KEYS_SHOWN
    ]
    return "\n".join(lines)


def lmpipe_training_fields(group: type) -> list[dataclasses.Field]:
    """The keys lmpipe adds to TrainingArguments (RunTrainingArguments' own, and DPOConfig's for DPO): always shown."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(group) if f.name not in inherited and f.init]


def _describe(f: dataclasses.Field, overrides: dict[str, Any] | None = None) -> str:
    """`  --name TYPE (default: X)` and the help's first line below it."""
    default = (overrides or {}).get(f.name, _default(f))
    text = (f.metadata.get("help") or "").strip().splitlines()
    line = text[0] if text else ""
    if len(line) > 150 and ". " in line:  # TrainingArguments' helps run on: their first sentence
        line = line.split(". ")[0] + "."
    if f.metadata.get("choices"):
        line += f" One of: {', '.join(map(str, f.metadata['choices']))}."
    return f"  --{f.name} {_type_name(f.type)} (default: {_plain(default)})\n      {line}".rstrip()


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _type_name(annotation: Any) -> str:
    """`int`, `str | None`, `SchedulerType | str`: the annotation without module paths."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value
