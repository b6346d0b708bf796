"""The loss the Trainer optimises and logs equals a manual shifted cross-entropy over the global batch."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lmpipe.loss.reference import manual_causal_lm_loss
from lmpipe.model.build import CAUSAL_LM_LOSS

VOCAB, LENGTH = 50, 12


def rows_with_uneven_masks() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, LENGTH), generator=generator)
    labels = input_ids.clone()
    labels[0, :7] = -100  # rows score very different numbers of tokens
    labels[2, 3:] = -100
    return input_ids, labels


def first_step_loss(loss_type, tmp_path) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    model.loss_type = loss_type
    input_ids, labels = rows_with_uneven_masks()
    with torch.no_grad():
        manual = manual_causal_lm_loss(model(input_ids).logits, labels).item()
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    collate = lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    logged = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    return logged, manual


def test_trainer_loss_equals_manual_shifted_cross_entropy(tmp_path):
    logged, manual = first_step_loss(CAUSAL_LM_LOSS, tmp_path)
    assert logged == pytest.approx(manual, rel=1e-5)


def test_gpt2_default_loss_type_under_reports_by_the_unshifted_count(tmp_path):
    """The bug our loss_type fixes: GPT-2's default divides by unshifted labels, (L-1)/L of the truth."""
    logged, manual = first_step_loss(None, tmp_path)
    _, labels = rows_with_uneven_masks()
    ratio = (labels[:, 1:] != -100).sum().item() / (labels != -100).sum().item()
    assert logged == pytest.approx(manual * ratio, rel=1e-5)
    assert logged < manual * 0.99
