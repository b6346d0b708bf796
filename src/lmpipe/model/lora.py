"""LoRA through peft: adapters on a pretrained model, and the adapter merged back into a plain model."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from lmpipe.config.arguments import LoraArguments
from lmpipe.errors import LmpipeError

MERGED_DIR = "merged"
ADAPTER_CONFIG = "adapter_config.json"


def wrap_lora(model: PreTrainedModel, lora: LoraArguments) -> PeftModel:
    """Freeze `model` and add adapters to `lora_target_modules`.

    The wrapped GPT-2 keeps its `loss_type`, so the Trainer still counts shifted labels.
    """
    return get_peft_model(model, lora_config(model, lora))


def lora_config(model: PreTrainedModel, lora: LoraArguments) -> LoraConfig:
    """The recipe's adapters on `model`'s `lora_target_modules` (checked by name).

    GPT-2's projections are `Conv1D` (weights stored in x out), which LoRA must know as `fan_in_fan_out`."""
    by_name = [(name.rsplit(".", 1)[-1], module) for name, module in model.named_modules()]
    missing = sorted(set(lora.lora_target_modules) - {leaf for leaf, _ in by_name})
    if missing:
        raise LmpipeError(f"lora_target_modules: the model has no module named {', '.join(missing)}")
    targets = [module for leaf, module in by_name if leaf in lora.lora_target_modules]
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules,
        fan_in_fan_out=all(isinstance(module, Conv1D) for module in targets),
    )


def is_adapter_directory(path: str | None) -> bool:
    """A LoRA run's output directory holds an adapter (adapter_config.json), not a whole model."""
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def base_model_of(adapter_dir: str) -> str:
    """The model an adapter was trained on, as its adapter_config.json names it."""
    try:
        return PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    except (OSError, ValueError) as e:
        raise LmpipeError(f"{adapter_dir}: cannot read {ADAPTER_CONFIG} ({str(e).strip().splitlines()[0]})") from None


def load_adapter(base: PreTrainedModel, adapter_dir: str) -> PeftModel:
    """A LoRA run's adapter on its base model, trainable (to train it on, e.g. with DPO)."""
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def save_merged(model: PeftModel, tokenizer: PreTrainedTokenizerBase, output_dir: str) -> PreTrainedModel:
    """Fold the adapters into the base weights and save a plain model + tokenizer in OUTPUT_DIR/merged.

    Kept apart from the adapter files in OUTPUT_DIR: a directory holding both would load the adapter on top of
    already-merged weights. Returns the merged model (the adapter model can no longer be trained afterwards).
    """
    merged = model.merge_and_unload()
    directory = Path(output_dir) / MERGED_DIR
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return merged
