"""LoRA through peft: adapters on a pretrained model, and the adapter merged back into a plain model."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from lmpipe.config.arguments import LoraArguments
from lmpipe.errors import LmpipeError

MERGED_DIR = "merged"


def wrap_lora(model: PreTrainedModel, lora: LoraArguments) -> PeftModel:
    """Freeze `model` and add adapters to `lora_target_modules`.

    GPT-2's projections are `Conv1D` (weights stored in x out), which LoRA must know as `fan_in_fan_out`.
    The wrapped GPT-2 keeps its `loss_type`, so the Trainer still counts shifted labels.
    """
    by_name = [(name.rsplit(".", 1)[-1], module) for name, module in model.named_modules()]
    missing = sorted(set(lora.lora_target_modules) - {leaf for leaf, _ in by_name})
    if missing:
        raise LmpipeError(f"lora_target_modules: the model has no module named {', '.join(missing)}")
    targets = [module for leaf, module in by_name if leaf in lora.lora_target_modules]
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules,
        fan_in_fan_out=all(isinstance(module, Conv1D) for module in targets),
    )
    return get_peft_model(model, config)


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
