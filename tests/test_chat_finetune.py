"""Conversation fine-tuning end to end on real NQ-open conversations with a tiny model: answer-only eval loss and
the token-weighted train loss against hand computations, the chat template saved with the run's tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpipe.cli import main
from lmpipe.data.chat import DEFAULT_CHAT_TEMPLATE
from lmpipe.data.sources import pydoc_documents
from lmpipe.model import build_model
from lmpipe.recipe import ModelArguments
from lmpipe.tokenizer import train_bpe_tokenizer

from conftest import DATA

CONVERSATIONS, HELD_OUT = 40, 4
HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny random GPT-2 with a 512-token BPE saved like a pretraining run, and the first 40 conversations."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = train_bpe_tokenizer(pydoc_documents()[:40], 512)
    torch.manual_seed(0)
    model = build_model(ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=320), tokenizer, 320)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lines = (DATA / "nq_open_conversations.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "chats.jsonl").write_text("".join(lines[:CONVERSATIONS]), encoding="utf-8")
    return root


def run(root, name, *flags):
    output = root / name
    assert main([
        "finetune-qa", "--model_name_or_path", str(root / "base"), "--train_file", str(root / "chats.jsonl"),
        "--messages_column", "messages", "--max_length", "320", "--output_dir", str(output),
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "8", "--logging_steps", "3",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "1", *flags,
    ]) == 0
    return output, json.loads((output / "metrics.json").read_text())


def hand_nll(model_dir, conversations) -> tuple[list[float], list[int]]:
    """Per conversation: summed NLL and count of its assistant contents + EOS, each turn tokenised by hand."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sums, counts = [], []
    for messages in conversations:
        ids, learned = [], []
        for message in messages:
            header = tokenizer(HEADERS[message["role"]])["input_ids"]
            content = tokenizer(message["content"])["input_ids"]
            end = [tokenizer.eos_token_id] if message["role"] == "assistant" else tokenizer("\n\n")["input_ids"]
            if message["role"] == "assistant":
                learned += range(len(ids) + len(header), len(ids) + len(header) + len(content) + 1)
            ids += header + content + end
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        sums.append(-sum(log_probs[p - 1, ids[p]].item() for p in learned))
        counts.append(len(learned))
    return sums, counts


def conversations(root):
    return [json.loads(line)["messages"] for line in (root / "chats.jsonl").read_text().splitlines()]


def test_answer_only_eval_loss_and_saved_template(root):
    output, metrics = run(root, "tuned", "--max_steps", "6", "--learning_rate", "0.01", "--eval_on_start", "true",
                          "--eval_strategy", "steps", "--eval_steps", "6")
    sums, counts = hand_nll(output, conversations(root)[-HELD_OUT:])
    assert metrics["eval_tokens"] == sum(counts)
    assert metrics["eval_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["examples"] == {"train": {"kept": CONVERSATIONS, "truncated": 0, "dropped": 0}}
    assert "exact_match" not in metrics and not (output / "predictions.jsonl").exists()
    assert AutoTokenizer.from_pretrained(output).chat_template == DEFAULT_CHAT_TEMPLATE


def test_train_loss_weights_steps_by_their_learned_tokens(root):
    """One epoch, one conversation a step, a learning rate too small to move the weights: the train loss must be
    the base model's total NLL / total learned tokens over the train rows, not the mean of per-row means."""
    train = CONVERSATIONS - HELD_OUT
    _, metrics = run(root, "frozen", "--max_steps", str(train), "--learning_rate", "1e-12", "--weight_decay", "0")
    sums, counts = hand_nll(root / "base", conversations(root)[:train])
    assert metrics["train_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    per_step_mean = sum(s / c for s, c in zip(sums, counts)) / train
    assert abs(per_step_mean - metrics["train_loss"]) > 1e-3  # the two differ: the test can tell them apart
