"""The loss check: passes on our configured model, fails (exit 1) on the Trainer's unshifted count."""

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lmpipe.cli import main
from lmpipe.config.arguments import ModelArguments
from lmpipe.loss.install import chunked_loss_of
from lmpipe.loss.reference import manual_causal_lm_loss
from lmpipe.loss_check import check_losses
from lmpipe.model.build import CAUSAL_LM_LOSS, build_model

from conftest import REPO, tiny_run

VOCAB, LENGTH = 50, 12


def rows_with_uneven_masks() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (6, LENGTH), generator=generator)
    labels = input_ids.clone()
    labels[0, :7] = -100  # rows score very different numbers of tokens, as QA rows do
    labels[2, 3:] = -100
    labels[5, :10] = -100
    return input_ids, labels


def tiny_trainer(loss_type, tmp_path, dtype=torch.float32) -> Trainer:
    """Two rows per micro-batch, two micro-batches per optimizer step."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.1)
    model = GPT2LMHeadModel(config).to(dtype)
    model.loss_type = loss_type
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, report_to=[],
        use_cpu=True, disable_tqdm=True,
    )
    return Trainer(model=model, args=args)


def micro_batches() -> list[dict]:
    input_ids, labels = rows_with_uneven_masks()
    return [{"input_ids": input_ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 6, 2)]


def test_check_agrees_with_one_manual_pass_over_each_step(tmp_path):
    trainer = tiny_trainer(CAUSAL_LM_LOSS, tmp_path)
    check = check_losses(trainer, micro_batches())
    assert check.first_disagreement() is None
    input_ids, labels = rows_with_uneven_masks()
    with torch.no_grad():  # independent: one forward over the step's four rows, one over the last two
        first_step = manual_causal_lm_loss(trainer.model(input_ids[:4]).logits, labels[:4]).item()
        everything = manual_causal_lm_loss(trainer.model(input_ids).logits, labels).item()
    assert [row.kept_tokens for row in check.rows] == [
        int((labels[:4, 1:] != -100).sum()), int((labels[4:, 1:] != -100).sum())
    ]
    assert check.rows[0].trainer == pytest.approx(first_step, rel=1e-5)
    assert check.total.manual == pytest.approx(everything, rel=1e-5)
    assert check.total.trainer == pytest.approx(everything, rel=1e-5)


def test_check_names_the_trainer_when_it_counts_unshifted_labels(tmp_path):
    check = check_losses(tiny_trainer(None, tmp_path), micro_batches())
    assert check.first_disagreement().startswith("batch 1: trainer loss")
    _, labels = rows_with_uneven_masks()
    ratio = (labels[:4, 1:] != -100).sum().item() / (labels[:4] != -100).sum().item()
    row = check.rows[0]
    assert row.trainer == pytest.approx(row.manual * ratio, rel=1e-5)
    assert row.model == pytest.approx(row.manual, rel=1e-5)
    assert row.cross_entropy == pytest.approx(row.manual, rel=1e-5)


def test_bf16_model_agrees_within_the_bf16_tolerance(tmp_path):
    check = check_losses(tiny_trainer(CAUSAL_LM_LOSS, tmp_path, torch.bfloat16), micro_batches())
    assert check.dtype == "bfloat16" and check.relative_tolerance > 1e-5
    assert check.first_disagreement() is None


def tiny_recipe_flags(corpus) -> list[str]:
    return [
        "--train_file", str(corpus),
        *tiny_run(dropout=0.1, gradient_accumulation_steps=2, batches=2, report_to=None, disable_tqdm=None),
    ]


def test_cli_passes_on_our_configured_model(text_file, capsys):
    assert main(["check-loss", *tiny_recipe_flags(text_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ok: the five losses agree")
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["batch"])
    assert lines[header].split()[3:8] == ["model", "manual", "cross_entropy", "chunked", "trainer"]
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["1", "2", "all"]
    assert lines[header + 4] == "the trainer's loss is the chunked one; chunked within 1e-06 of manual"
    gradients = [line.split() for line in lines[header + 6 : -1]]
    assert [g[0] for g in gradients] == ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "final"]
    assert all(float(g[-1]) <= 1e-5 for g in gradients)


def test_check_reports_the_chunked_loss_and_its_gradients_and_leaves_the_model_as_it_was(tmp_path):
    """The chunked column equals an independent manual loss; the check installs it only for itself."""
    trainer = tiny_trainer(CAUSAL_LM_LOSS, tmp_path)
    check = check_losses(trainer, micro_batches())
    input_ids, labels = rows_with_uneven_masks()
    with torch.no_grad():
        first_step = manual_causal_lm_loss(trainer.model(input_ids[:4]).logits, labels[:4]).item()
    assert check.rows[0].chunked == pytest.approx(first_step, rel=1e-6)
    assert set(check.gradients) == {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                                    "final hidden states"}
    assert max(check.gradients.values()) <= 1e-5 and not check.trainer_chunked
    assert chunked_loss_of(trainer.model) is None
    assert trainer.model(input_ids[:2], labels=labels[:2]).logits.shape == (2, LENGTH, VOCAB)


def test_a_broken_chunked_loss_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("lmpipe.loss.install.causal_lm_loss", lambda total, kept, count=None: total / (kept + 1))
    check = check_losses(tiny_trainer(CAUSAL_LM_LOSS, tmp_path), micro_batches())
    assert check.first_disagreement().startswith("batch 1: chunked loss")


def test_cli_exits_1_when_the_model_keeps_gpt2s_default_loss_type(text_file, capsys, monkeypatch):
    monkeypatch.setattr("lmpipe.model.build.CAUSAL_LM_LOSS", None)  # build_model then leaves loss_type=None
    assert main(["check-loss", *tiny_recipe_flags(text_file)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("loss check failed: batch 1: trainer loss")


@pytest.mark.slow
def test_cli_checks_a_saved_model_with_its_own_tokenizer(gpt2_tokenizer, text_file, tmp_path, capsys):
    saved = tmp_path / "model"
    build_model(ModelArguments(n_layer=1, n_embd=16, n_head=2, n_positions=32),
                gpt2_tokenizer, 32).save_pretrained(saved)
    gpt2_tokenizer.save_pretrained(saved)
    flags = ["--train_file", str(text_file), "--block_size", "32", "--per_device_train_batch_size", "2",
             "--batches", "1"]
    assert main(["check-loss", "--model_name_or_path", str(saved), *flags]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ok:")


def test_a_trained_tokenizer_with_a_saved_model_is_refused(tmp_path, capsys):
    recipe = str(REPO / "recipes" / "pretrain" / "default.yaml")
    assert main(["check-loss", recipe, "--model_name_or_path", str(tmp_path / "model")]) == 2
    assert "add --train_tokenizer false" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_script_exits_2_with_one_line():
    result = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "check_loss.py"), "--batches", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: batches must be >= 1, got 0"
