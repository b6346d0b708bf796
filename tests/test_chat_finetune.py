"""Conversation fine-tuning end to end on real NQ-open conversations with a tiny model: answer-only eval loss and
the token-weighted train loss against hand computations, the chat template saved with the run's tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpipe.cli import main
from lmpipe.config.arguments import ModelArguments
from lmpipe.data.chat import DEFAULT_CHAT_TEMPLATE
from lmpipe.data.sources import pydoc_documents
from lmpipe.model.build import build_model
from lmpipe.model.tokenizer import train_bpe_tokenizer

from conftest import DATA, tiny_run

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


@pytest.mark.slow
def test_answer_only_eval_loss_and_saved_template(root):
    output, metrics = run(root, "tuned", "--max_steps", "6", "--learning_rate", "0.01", "--eval_on_start", "true",
                          "--eval_strategy", "steps", "--eval_steps", "6")
    sums, counts = hand_nll(output, conversations(root)[-HELD_OUT:])
    assert metrics["eval_tokens"] == sum(counts)
    assert metrics["eval_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["examples"] == {"train": {"kept": CONVERSATIONS - HELD_OUT, "truncated": 0, "dropped": 0},
                                   "validation": {"kept": HELD_OUT, "truncated": 0, "dropped": 0}}
    assert "exact_match" not in metrics and not (output / "predictions.jsonl").exists()
    assert AutoTokenizer.from_pretrained(output).chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.slow
def test_train_loss_weights_steps_by_their_learned_tokens(root):
    """One epoch, one conversation a step, a learning rate too small to move the weights: the train loss must be
    the base model's total NLL / total learned tokens over the train rows, not the mean of per-row means."""
    train = CONVERSATIONS - HELD_OUT
    _, metrics = run(root, "frozen", "--max_steps", str(train), "--learning_rate", "1e-12", "--weight_decay", "0")
    sums, counts = hand_nll(root / "base", conversations(root)[:train])
    assert metrics["train_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    per_step_mean = sum(s / c for s, c in zip(sums, counts)) / train
    assert abs(per_step_mean - metrics["train_loss"]) > 1e-3  # the two differ: the test can tell them apart


# --- show-data: what it prints and writes is what the Trainer's dataloader yields ------------------------------

def dataloader_examples(trainer) -> list[tuple[list[int], list[int]]]:
    """One epoch of the Trainer's own train dataloader, cut back into examples (padding or packing undone)."""
    examples = []
    for batch in trainer.get_train_dataloader():
        ids, labels = batch["input_ids"], batch["labels"]
        if "position_ids" in batch:  # padding-free: one row, an example starts where the positions restart at 0
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            examples += [(ids[0, a:b].tolist(), labels[0, a:b].tolist()) for a, b in zip(starts, starts[1:])]
        else:
            lengths = (batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch
                       else [ids.shape[1]] * len(ids))
            examples += [(ids[r, :n].tolist(), labels[r, :n].tolist()) for r, n in enumerate(lengths)]
    return sorted(examples)


def jsonl_examples(path) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((row["input_ids"], row["labels"]) for row in rows)


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_show_data_jsonl_is_what_the_trainer_receives_for_conversations(batching, root, tmp_path, capsys):
    from lmpipe.config.arguments import FINETUNE_QA_GROUPS
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.finetune import build_qa_trainer

    flags = ["--model_name_or_path", str(root / "base"), "--train_file", str(root / "chats.jsonl"),
             "--messages_column", "messages", "--max_length", "320", "--batching", batching,
             "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    path = tmp_path / "shown.jsonl"
    assert main(["show-data", "--task", "qa", *flags, "--rows", "1000", "--jsonl", str(path), "--colour", "never"]) == 0
    shown = jsonl_examples(path)
    assert len(shown) == CONVERSATIONS - HELD_OUT
    assert {json.loads(line)["source"] for line in path.read_text().splitlines()} == {str(root / "chats.jsonl")}
    printed = capsys.readouterr().out
    first = conversations(root)[0]  # the first example's answers and their EOS are bracketed, nothing else
    assert [part.split("]")[0] for part in printed.split("--- example 2")[0].split("[")[1:]] == [
        m["content"] + "<|endoftext|>" for m in first if m["role"] == "assistant"]
    recipe = parse_recipe(flags, groups=FINETUNE_QA_GROUPS)
    trainer = build_qa_trainer(recipe, recipe.training, None)[0]
    assert dataloader_examples(trainer) == shown


def test_show_data_jsonl_is_what_the_trainer_receives_for_pretraining(tmp_path):
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.pretrain import build_pretrain_trainer

    from conftest import write_pydoc_corpus

    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 8)
    flags = ["--train_file", str(corpus), *tiny_run(n_embd=16, output_dir=tmp_path / "out", disable_tqdm=None)]
    path = tmp_path / "shown.jsonl"
    assert main(["show-data", *flags, "--rows", "100000", "--jsonl", str(path)]) == 0
    recipe = parse_recipe(flags)
    trainer = build_pretrain_trainer(recipe, recipe.training)[0]
    examples = dataloader_examples(trainer)
    assert examples == jsonl_examples(path) and all(ids == labels for ids, labels in examples)


def test_generate_chat_answers_each_message_with_the_template_turn_by_turn(root, capsys):
    """Each reply equals a hand greedy decode of the conversation so far, written out turn by turn."""
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    questions = ["who wrote hamlet", "and macbeth"]
    assert main(["generate", "--model_name_or_path", str(root / "base"), "--system", "Be brief.",
                 "--chat", *questions, "--max_new_tokens", "6"]) == 0
    printed = capsys.readouterr().out.splitlines()
    ids = tokenizer(HEADERS["system"] + "Be brief." + "\n\n")["input_ids"]
    expected = ["system: Be brief."]
    for question in questions:
        ids += (tokenizer(HEADERS["user"])["input_ids"] + tokenizer(question)["input_ids"]
                + tokenizer("\n\n")["input_ids"])
        ids += tokenizer(HEADERS["assistant"])["input_ids"]
        new = []
        with torch.no_grad():
            while len(new) < 6:
                token = int(model(torch.tensor([ids + new])).logits[0, -1, : len(tokenizer)].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        reply = tokenizer.decode(new)
        ids += tokenizer(reply)["input_ids"] + [tokenizer.eos_token_id]
        expected += [f"user: {question}", f"assistant: {reply}"]
    assert "\n".join(printed) == "\n".join(expected)


BAD_RUNS = {
    "bad row": (["--train_file", "{root}/bad.jsonl"], "bad.jsonl row 2: turn 2 has role 'bot'; roles are system"),
    "too many dropped": (["--max_length", "40"], "chats.jsonl: 40 of 40 conversations (100.0%) have no learned token"),
    "mixture and train_file": (["--datasets", '{{"path": "{root}/chats.jsonl", "weight": 2}}'],
                               "--train_file is not used by this run: datasets lists the sources"),
    "bad share": (["--max_dropped_share", "1.5"], "max_dropped_share must be in [0, 1], got 1.5"),
}


@pytest.mark.parametrize("name", BAD_RUNS)
def test_a_bad_conversation_run_stops_with_one_line_and_no_finished_run(name, root, tmp_path, capsys):
    (root / "bad.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    flags, message = BAD_RUNS[name]
    args = ["finetune-qa", "--model_name_or_path", str(root / "base"), "--train_file", str(root / "chats.jsonl"),
            "--messages_column", "messages", "--max_length", "320", "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", *[flag.format(root=root) for flag in flags]]
    assert main(args) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_a_two_source_mixture_run_reports_its_realised_shares(root, tmp_path, capsys):
    """Real NQ conversations (36 train rows, weight 3) and real Shakespeare dialogue (36, weight 1): 75 % / 25 %."""
    lines = (DATA / "shakespeare_dialogues.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "plays.jsonl").write_text("".join(lines[:CONVERSATIONS]), encoding="utf-8")
    sources = ['{"path": "%s", "weight": 3}' % (root / "chats.jsonl"), '{"path": "%s"}' % (root / "plays.jsonl")]
    output = tmp_path / "mixture"
    assert main(["finetune-qa", "--model_name_or_path", str(root / "base"), "--datasets", *sources,
                 "--messages_column", "messages", "--max_length", "320", "--output_dir", str(output),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                 "--report_to", "none", "--disable_tqdm", "true"]) == 0
    shares = json.loads((output / "metrics.json").read_text())["mixture"]
    chats, plays = shares[str(root / "chats.jsonl")], shares[str(root / "plays.jsonl")]
    assert (chats["examples"], plays["examples"]) == (3 * 36, 36)
    assert (chats["example_share"], plays["example_share"]) == (0.75, 0.25)
    assert chats["learned_token_share"] + plays["learned_token_share"] == pytest.approx(1.0)
    assert capsys.readouterr().out.count("mixture: ") == 1
    path = tmp_path / "shown.jsonl"
    assert main(["show-data", "--task", "qa", "--model_name_or_path", str(root / "base"), "--datasets", *sources,
                 "--messages_column", "messages", "--max_length", "320", "--rows", "1000", "--jsonl", str(path)]) == 0
    shown = [json.loads(line)["source"] for line in path.read_text().splitlines()]
    assert (shown.count(str(root / "chats.jsonl")), shown.count(str(root / "plays.jsonl"))) == (108, 36)


def test_a_plain_text_end_marker_stops_a_reply_as_a_stop_string(root):
    """A template whose assistant turn ends in plain text: the reply is the free (seeded, sampled) text cut before
    the first place that text appears, even when the prompt itself ends like the marker begins."""
    from lmpipe.data.chat import chat_format
    from lmpipe.generate import GenerationSettings, chat_stops, generate_from_ids

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    prompt = tokenizer("Question: who wrote hamlet\nAnswer:")["input_ids"]
    settings = GenerationSettings(max_new_tokens=24, do_sample=True, seed=3)
    free = generate_from_ids(model, tokenizer, [prompt], settings)[0]
    cut = next(i for i in range(len(free) // 2, len(free) - 1) if free.find(free[i : i + 2]) == i)
    stop = free[cut : cut + 2]  # first seen half-way through the free text
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + " + repr(stop) + " }}{% endfor %}"
    stop_ids, stop_text = chat_stops(tokenizer, chat_format(tokenizer, template))
    assert (stop_ids, stop_text) == ([tokenizer.eos_token_id], stop)
    assert generate_from_ids(model, tokenizer, [prompt], settings, 1, stop_ids, stop_text)[0] == free[:cut]
