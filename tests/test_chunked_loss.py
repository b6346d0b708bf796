"""The chunked linear + cross-entropy against a manual log_softmax + gather loss and the model's own (unchunked)
loss and gradients, on sizes that do not divide evenly, rows with no scored label and a packed QA batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, GPT2Config, GPT2LMHeadModel

from lmpipe.loss.chunked import (
    ChunkWorkspace,
    LinearCrossEntropy,
    causal_lm_loss,
    even_chunk_tokens,
    linear_cross_entropy,
    shifted_targets,
)
from lmpipe.loss.install import chunked_loss_enabled, install_chunked_loss, token_scores
from lmpipe.loss.reference import IGNORE_INDEX, manual_causal_lm_loss
from lmpipe.training.exact_eval import NllStatistics

VOCAB = 101  # prime: no chunk size divides it or the token counts below


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    model.config.use_cache = False  # as lmpipe trains: a packed row's examples are told apart only without a cache
    return model


def odd_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows of 13 tokens: row 1 has every label -100, row 2 its first 5."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 13), generator=generator)
    labels = ids.clone()
    labels[1] = IGNORE_INDEX
    labels[2, :5] = IGNORE_INDEX
    return ids, labels


def cpu_block_rows(monkeypatch, rows: int) -> None:
    """Make the chunk's softmax walk `rows` rows at a time (by default a block is 4 MiB, more rows than here)."""
    monkeypatch.setattr(ChunkWorkspace, "CPU_BLOCK_BYTES", rows * 4 * VOCAB)


@pytest.mark.parametrize("chunk_tokens, block_rows", [(1, None), (4, None), (7, None), (1000, None), (7, 3), (1000, 3)])
def test_function_matches_manual_log_softmax_gather(chunk_tokens, block_rows, monkeypatch):
    """Loss to 1e-6 and gradients (hidden states and weight) to 1e-5 of autograd through log_softmax + gather,
    also when a chunk's softmax is done in blocks of rows that divide neither the chunk nor the tokens."""
    if block_rows:
        cpu_block_rows(monkeypatch, block_rows)
    torch.manual_seed(0)
    hidden = torch.randn(3, 13, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    _, labels = odd_batch()
    manual = manual_causal_lm_loss(hidden @ weight.T, labels)
    manual_grads = torch.autograd.grad(manual, (hidden, weight))
    total, nll, kept = linear_cross_entropy(hidden, weight, shifted_targets(labels), chunk_tokens)
    loss = causal_lm_loss(total, len(kept))
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert len(kept) == 12 + 0 + 8  # shifted: row 0 keeps 12 targets, row 1 none, row 2 labels 5..12
    assert abs(loss.item() - manual.item()) / manual.item() < 1e-6
    for grad, manual_grad in zip(grads, manual_grads):
        assert relative(grad, manual_grad) < 1e-5


def test_function_gradients_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    assert torch.autograd.gradcheck(
        lambda h, w: LinearCrossEntropy.apply(h, w, targets, 4, torch.float64, (True, True))[0], (hidden, weight)
    )


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    hidden = {}
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: hidden.setdefault("h", args[0]), prepend=True)
    outputs = model(**inputs)
    handle.remove()
    hidden["h"].retain_grad()
    outputs.loss.backward()
    named = dict(model.named_parameters())
    grads = {name: named[name].grad.clone()
             for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight")}
    grads["final hidden states"] = hidden["h"].grad.clone()
    return outputs.loss.detach(), grads


@pytest.mark.parametrize("num_items_in_batch", [None, 23])
def test_model_chunked_equals_its_own_loss_and_gradients(num_items_in_batch):
    """Tied lm_head/wte: the chunked model's loss to 1e-6 and its gradients to 1e-5 of the unchunked model's;
    `num_items_in_batch` (the Trainer's token count over accumulation and ranks) divides the sum, as ForCausalLMLoss."""
    ids, labels = odd_batch()
    reference = tiny_model()
    chunked = copy.deepcopy(reference)
    install_chunked_loss(chunked, True, chunk_tokens=5)
    count = None if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    loss, grads = _loss_and_grads(chunked, input_ids=ids, labels=labels, num_items_in_batch=count)
    own_loss, own_grads = _loss_and_grads(reference, input_ids=ids, labels=labels, num_items_in_batch=count)
    manual = manual_causal_lm_loss(reference(input_ids=ids).logits, labels)
    if num_items_in_batch is not None:
        manual = manual * 20 / num_items_in_batch  # 20 scored tokens
    assert abs(loss - own_loss) / own_loss < 1e-6
    assert abs(loss - manual) / manual < 1e-6
    for name, grad in grads.items():
        assert relative(grad, own_grads[name]) < 1e-5, name


def test_model_without_labels_still_returns_logits_and_own_loss_context():
    ids, labels = odd_batch()
    model = tiny_model()
    install_chunked_loss(model, True, chunk_tokens=5)
    assert model(input_ids=ids).logits.shape == (3, 13, VOCAB)  # generation path untouched
    outputs = model(input_ids=ids, labels=labels)
    assert not hasattr(outputs, "logits") and outputs.token_nll.shape == (3, 13)
    with chunked_loss_enabled(model, False):
        own = model(input_ids=ids, labels=labels)
    assert own.logits.shape == (3, 13, VOCAB)
    assert abs(own.loss - outputs.loss) / own.loss < 1e-6


def test_token_nll_gives_the_same_exact_eval_rows_as_logits():
    """NllStatistics on the chunked per-token NLL = on the full logits (summed NLL, tokens, bytes per row)."""
    ids, labels = odd_batch()
    model = tiny_model().eval()
    statistics = NllStatistics(torch.arange(VOCAB) % 4)
    with torch.no_grad():
        from_logits = statistics(token_scores(model, ids, labels), labels)
        install_chunked_loss(model, True, chunk_tokens=4)
        from_chunks = statistics(token_scores(model, ids, labels), labels)
    assert torch.equal(from_chunks[:, 1:], from_logits[:, 1:])
    assert from_chunks[1].tolist() == [0.0, 0.0, 0.0]  # the row with no scored label
    assert relative(from_chunks[:, 0], from_logits[:, 0]) < 1e-6


def test_token_nll_padded_across_ranks_counts_only_scored_positions():
    """The Trainer pads each rank's eval outputs and labels to the longest rank's with -100 before
    preprocess_logits_for_metrics: padded positions must add nothing (a two-rank QA eval once came out negative)."""
    ids, labels = odd_batch()
    model = tiny_model().eval()
    install_chunked_loss(model, True, chunk_tokens=4)
    statistics = NllStatistics(torch.arange(VOCAB) % 4)
    with torch.no_grad():
        scores = token_scores(model, ids, labels)
    padded = statistics(F.pad(scores, (0, 5), value=IGNORE_INDEX), F.pad(labels, (0, 5), value=IGNORE_INDEX))
    assert torch.equal(padded, statistics(scores, labels))


def test_packed_qa_batch():
    """A padding-free row (DataCollatorWithFlattening: position_ids restart, each example's first label -100)."""
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]},
        {"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, 12, 13]},
        {"input_ids": [20, 21, 22, 23, 24, 25, 26], "labels": [IGNORE_INDEX] * 4 + [24, 25, 26]},
    ]
    batch = DataCollatorWithFlattening(return_tensors="pt")(examples)
    reference = tiny_model()
    chunked = copy.deepcopy(reference)
    install_chunked_loss(chunked, True, chunk_tokens=3)
    loss, grads = _loss_and_grads(chunked, **batch)
    own_loss, own_grads = _loss_and_grads(reference, **batch)
    manual = sum(
        manual_causal_lm_loss(reference(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]]))
        * (sum(label != IGNORE_INDEX for label in e["labels"]) - (e["labels"][0] != IGNORE_INDEX))
        for e in examples
    ) / 8  # 3 + 2 + 3 answer tokens, each example scored alone
    assert abs(loss - own_loss) / own_loss < 1e-6
    assert abs(loss - manual) / manual < 1e-5
    for name, grad in grads.items():
        assert relative(grad, own_grads[name]) < 1e-5, name


@pytest.mark.parametrize("block_rows", [None, 2])
def test_bf16_autocast_multiplies_in_bf16_and_accumulates_in_fp32(block_rows, monkeypatch):
    """Under bf16 autocast the chunked loss is the model's own (its lm_head multiplies in bf16, the loss is fp32)
    to bf16 rounding, and the fp32 weight gradient stays fp32 (whole chunks, or their rows two at a time)."""
    if block_rows:
        cpu_block_rows(monkeypatch, block_rows)
    ids, labels = odd_batch()
    reference = tiny_model()
    chunked = copy.deepcopy(reference)
    install_chunked_loss(chunked, True, chunk_tokens=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(chunked, input_ids=ids, labels=labels)
        own_loss, own_grads = _loss_and_grads(reference, input_ids=ids, labels=labels)
    assert loss.dtype == torch.float32
    assert abs(loss - own_loss) / own_loss < 1e-3
    assert grads["transformer.wte.weight"].dtype == torch.float32
    for name, grad in grads.items():
        assert relative(grad, own_grads[name]) < 2e-2, name


def trainer_losses(tmp_path, chunked: bool, **arguments) -> list[float]:
    """Per-step training losses of 5 steps (2 accumulated micro-batches each) with the Trainer, fp32."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    install_chunked_loss(model, chunked, chunk_tokens=7)
    ids = torch.randint(0, VOCAB, (40, 32), generator=torch.Generator().manual_seed(1)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        **arguments,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_steps_with_the_chunked_loss_and_gradient_checkpointing_equal_the_plain_run(tmp_path):
    plain = trainer_losses(tmp_path / "plain", chunked=False)
    for losses in (
        trainer_losses(tmp_path / "chunked", chunked=True),
        trainer_losses(tmp_path / "checkpointed", chunked=True, gradient_checkpointing=True),
    ):
        assert losses == pytest.approx(plain, rel=1e-5) and len(losses) == 5


@pytest.mark.slow
def test_trainer_steps_with_the_chunked_loss_under_torch_compile_equal_the_plain_run(tmp_path):
    """`torch_compile: true` (inductor, which needs a C++ compiler on CPU) trains the same losses, fp32, 5 steps."""
    from torch._dynamo.utils import counters  # dynamo's own tally: proves the run was compiled, not eager

    plain = trainer_losses(tmp_path / "plain", chunked=False)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = trainer_losses(tmp_path / "compiled", chunked=True, torch_compile=True)
    assert counters["stats"]["unique_graphs"] > graphs_before
    assert compiled == pytest.approx(plain, rel=1e-5) and len(compiled) == 5


@pytest.mark.parametrize("tokens, most, even", [(2040, 667, 510), (20, 7, 7), (20, 4, 4), (9, 10, 9), (0, 7, 1)])
def test_chunks_are_the_fewest_of_at_most_the_budget_and_even(tokens, most, even):
    """2,040 tokens at most 667 a chunk: 4 x 510, not 3 x 667 + 39 (the loss runs on 20 as 7 + 7 + 6)."""
    assert even_chunk_tokens(tokens, most) == even
