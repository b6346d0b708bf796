"""Every parsed recipe value checked against its range before any data is read, in one line naming the key.

The parser checks types only; transformers and torch accept many values that cannot train (a 0-layer model, a
negative dropout, an infinite learning rate), fail only after the corpus is tokenised, or ignore them (0 for
`save_total_limit` or `max_train_documents`). The rules hold by key name, for whichever command's dataclasses
have that key; a rule for an optional key applies only when it is set. These are the only copies: `parse_recipe`
applies them to every command line, and the library's entry points (`pretrain`, `finetune_qa`, the loss check,
`evaluate_file`, ...) apply them again through `check_values`, so a recipe built in Python is held to the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers import SchedulerType
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.training_args import OptimizerNames

from lmpipe.errors import LmpipeError

Rule = tuple[Callable[[Any], bool], str]


def _at_least(low: float) -> Rule:
    return (lambda v: v >= low), f">= {low:g}"


POSITIVE: Rule = (lambda v: v > 0), "> 0"
NON_NEGATIVE = _at_least(0)
PROBABILITY: Rule = (lambda v: 0 <= v < 1), "in [0, 1)"
SEED: Rule = (lambda v: 0 <= v < 2**32), "in [0, 2**32)"  # numpy's seeding range
NOT_EMPTY: Rule = (lambda v: len(v) > 0), "a non-empty list"


def _one_of(choices: Iterable[str]) -> Rule:
    allowed = sorted(choices)
    return (lambda v: v in allowed), f"one of {', '.join(allowed)}"


def _each_one_of(choices: Iterable[str]) -> Rule:
    allowed = sorted(choices)
    return (lambda v: len(v) > 0 and all(x in allowed for x in v)), f"a non-empty list of {', '.join(allowed)}"


# TRL 1.16's DPOTrainer's loss types and f-divergences (it raises only once training has started).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


RULES: dict[str, Rule] = {
    **dict.fromkeys(
        [
            "n_layer", "n_embd", "n_head", "n_positions", "pad_vocab_to_multiple_of", "max_train_documents",
            "preprocessing_num_workers", "streaming_validation_documents", "generation_max_new_tokens", "lora_r",
            "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "eval_accumulation_steps", "save_total_limit", "batch_size", "max_new_tokens", "stride",
            "dataloader_prefetch_factor", "torch_empty_cache_steps", "chunked_loss_tokens", "batches", "rows",
            "limit", "precompute_ref_batch_size", "ref_model_sync_steps",
        ],
        _at_least(1),
    ),
    "block_size": _at_least(2),  # one input and one label
    "max_length": _at_least(2),  # one prompt token and EOS
    "tokenizer_vocab_size": (lambda v: v >= 257, ">= 257 (256 byte tokens and <|endoftext|>)"),
    **dict.fromkeys(
        ["learning_rate", "adam_epsilon", "logging_steps", "eval_steps", "save_steps", "lora_alpha",
         "muon_learning_rate", "beta", "discopop_tau"],
        POSITIVE,
    ),
    **dict.fromkeys(
        ["warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers", "top_k", "eval_delay",
         "neftune_noise_alpha", "num_train_epochs", "muon_weight_decay"],
        NON_NEGATIVE,
    ),
    **dict.fromkeys(
        ["dropout", "lora_dropout", "adam_beta1", "adam_beta2", "label_smoothing_factor", "muon_momentum",
         "label_smoothing"],
        PROBABILITY,
    ),
    "top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    **dict.fromkeys(
        ["warmup_ratio", "max_dropped_share", "min_lr_ratio", "ld_alpha", "ref_model_mixup_alpha"],
        ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    ),
    "decay_fraction": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "muon_ns_steps": ((lambda v: 1 <= v < 100), "in [1, 100)"),  # torch.optim.Muon refuses 100 and more
    "validation_split_percentage": ((lambda v: 0 <= v < 100), "in [0, 100)"),
    "max_steps": ((lambda v: v >= -1), ">= -1 (-1: train num_train_epochs)"),  # 0: check_training_length
    **dict.fromkeys(["seed", "data_seed"], SEED),
    "lora_target_modules": NOT_EMPTY,
    "loss_type": _each_one_of(DPO_LOSS_TYPES),
    "loss_weights": ((lambda v: all(math.isfinite(x) and x >= 0 for x in v)), "a list of finite numbers >= 0"),
    "f_divergence_type": _one_of(F_DIVERGENCES),
    "attn_implementation": _one_of({"eager", *(key for key in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in key)}),
}


def _fields(arguments: Iterable[Any]) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every recipe key's group and field; `init=False` fields are set by lmpipe, not keys (DPO's max_length)."""
    return {field.name: (group, field) for group in arguments for field in dataclasses.fields(group) if field.init}


def check_nulls(mapping: dict[str, Any], arguments: Iterable[Any], source: str) -> None:
    """`key: null` in a recipe means "no value", which only an optional key without a default can take."""
    fields = _fields(arguments)
    for key, value in mapping.items():
        if value is None and key in fields:
            field = fields[key][1]
            default = None if field.default is dataclasses.MISSING else field.default
            if default is not None or field.default_factory is not dataclasses.MISSING:
                shown = field.default_factory() if field.default_factory is not dataclasses.MISSING else default
                raise LmpipeError(f"{source}: '{key}' is null; give it a value or remove the line (default: {shown!r})")


def check_recipe_values(arguments: Iterable[Any], from_file: set[str], source: str | None) -> None:
    """Raise LmpipeError naming the first key whose value is out of range; keys set in the file name the file."""
    for name, (group, _) in _fields(arguments).items():
        value = getattr(group, name)
        where = f"{source}: " if source and name in from_file else ""
        if isinstance(value, float) and not math.isfinite(value):
            raise LmpipeError(f"{where}{name} must be a finite number, got {value}")
        rule = RULES.get(name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        test, description = rule
        if not test(value):
            raise LmpipeError(f"{where}{name} must be {description}, got {value}")
    output_dir = next((g.output_dir for g in arguments if hasattr(g, "output_dir")), None)
    if output_dir and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise LmpipeError(f"output_dir {output_dir}: is a file, not a directory")


def check_values(*groups: Any) -> None:
    """The same rules for argument groups built in Python (the library's entry points call this)."""
    check_recipe_values(groups, set(), None)


def check_training_length(training: Any) -> None:
    """`max_steps: 0`, or no steps and no epochs, would start a run that trains nothing."""
    if training.max_steps == 0 or (training.max_steps < 0 and not training.num_train_epochs > 0):
        raise LmpipeError(
            f"nothing to train: max_steps={training.max_steps}, num_train_epochs={training.num_train_epochs}"
        )


# The recipe keys that shape lr_scheduler_type warmup_stable_decay, and the lr_scheduler_kwargs each one sets.
WSD_KEYS = {"decay_fraction": "num_decay_steps", "min_lr_ratio": "min_lr_ratio", "decay_type": "decay_type"}
MUON_KEYS = ("muon_learning_rate", "muon_momentum", "muon_weight_decay", "muon_nesterov", "muon_ns_steps")
# Recipe-file keys read only while another key has one value: a flag giving that key another value drops them, as
# a flag naming a source drops the file's source (`--optimizer adamw` on a Muon recipe is an AdamW run).
READ_ONLY_WITH = {"optimizer": ("muon", MUON_KEYS), "lr_scheduler_type": ("warmup_stable_decay", tuple(WSD_KEYS))}


def check_optimizer(training: Any, use_lora: bool = False) -> None:
    """`optimizer: muon` and the warmup_stable_decay keys against what they work with, before any data."""
    muon = getattr(training, "optimizer", "adamw") == "muon"  # plain TrainingArguments: the Trainer's AdamW
    stray = next((key for key in MUON_KEYS if getattr(training, key, None) is not None), None)
    if stray and not muon:
        raise LmpipeError(f"{stray} is for optimizer: muon, got optimizer: {getattr(training, 'optimizer', 'adamw')}")
    if muon and use_lora:
        raise LmpipeError("optimizer: muon trains whole weight matrices, not LoRA adapters: use optimizer: adamw")
    if muon and training.fsdp:
        raise LmpipeError("optimizer: muon orthogonalises whole matrices, which FSDP shards: use DDP or adamw")
    if muon and training.optim not in (OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW_TORCH_FUSED):
        raise LmpipeError(
            f"optimizer: muon runs torch's AdamW beside Muon: optim must be adamw_torch or adamw_torch_fused, "
            f"got {OptimizerNames(training.optim).value}"
        )
    given = [key for key in WSD_KEYS if getattr(training, key, None) is not None]
    scheduler = SchedulerType(training.lr_scheduler_type)
    wsd = scheduler == SchedulerType.WARMUP_STABLE_DECAY
    if given and not wsd:
        raise LmpipeError(f"{given[0]} is for lr_scheduler_type: warmup_stable_decay, got {scheduler.value}")
    kwargs = training.lr_scheduler_kwargs or {}
    both = next((key for key in given if WSD_KEYS[key] in kwargs), None)
    if both:
        raise LmpipeError(f"set {both} or lr_scheduler_kwargs' {WSD_KEYS[both]}, not both")
    if wsd and "decay_fraction" not in given and "num_decay_steps" not in kwargs:
        raise LmpipeError("lr_scheduler_type: warmup_stable_decay needs decay_fraction (the share of steps decaying)")


_CONVERSATIONS = "messages_column is set: a conversation has no question/answer columns, prompt or generated answers"
_SOURCES = "datasets lists the sources; give them there or drop the list"
# Keys a run does not read, by key name: while another key has a value (True) or has none (False). A rule applies
# only to a command that has both keys. `parse_recipe` refuses such a key in one line instead of running without it.
UNUSED_WHEN: dict[str, list[tuple[str, bool, str]]] = {
    **{key: [("datasets", True, _SOURCES)] for key in ("train_file", "validation_file")},
    "dataset_config_name": [("datasets", True, _SOURCES), ("dataset_name", False, "it configures a dataset_name")],
    "dataset_name": [("datasets", True, _SOURCES), ("train_file", True, "train_file is read instead")],
    "validation_split_percentage": [("validation_file", True, "validation_file is the validation split")],
    **{
        key: [("messages_column", True, _CONVERSATIONS)]
        for key in ("question_column", "answer_column", "context_column", "prompt_template", "answer_prefix",
                    "generation_max_new_tokens")
    },
    **{
        key: [("messages_column", False, "only conversations (messages_column) use it")]
        for key in ("chat_template", "learn_assistant_turns", "max_dropped_share")
    },
    **{
        key: [("use_lora", False, "only LoRA (use_lora: true) uses it")]
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
    },
    "streaming_validation_documents": [("streaming", False, "only a streamed corpus holds out its first documents")],
    "tokenizer_vocab_size": [("train_tokenizer", False, "only train_tokenizer: true makes a vocabulary")],
}


def unused_reason(key: str, values: dict[str, Any]) -> str | None:
    """Why the run does not read `key`, given every key's value (`values`, the command's keys only); else None."""
    for other, present, reason in UNUSED_WHEN.get(key, ()):
        if other in values and bool(values[other]) == present:
            return reason
    return None
