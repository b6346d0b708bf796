"""QA fine-tuning: LoRA trains only adapters and merges exactly, the Trainer's loss is the answer-only loss,
and a tiny pretrain -> fine-tune on real NQ-open questions runs end to end with metrics checked by hand."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from lmpipe.cli import main
from lmpipe.config.arguments import LoraArguments, ModelArguments, QAArguments
from lmpipe.data.collate import padded_collator
from lmpipe.data.qa import TRAINING_COLUMNS, tokenize_qa
from lmpipe.loss.reference import IGNORE_INDEX, manual_causal_lm_loss
from lmpipe.model.build import CAUSAL_LM_LOSS, build_model
from lmpipe.model.lora import MERGED_DIR, save_merged, wrap_lora

from conftest import DATA, tiny_run, write_pydoc_corpus

NQ_OPEN = DATA / "nq_open_efficientqa_dev.jsonl"
QA_PAIRS = {
    "what is the capital of france": ["Paris"],
    "who wrote the origin of species": ["Charles Darwin", "Darwin"],
    "how many legs does a spider have": ["eight"],
    "which planet is known as the red planet in the solar system": ["Mars"],
}


def qa_rows(tokenizer) -> Dataset:
    split = Dataset.from_dict({"question": list(QA_PAIRS), "answer": list(QA_PAIRS.values())})
    encoded, _ = tokenize_qa(split, tokenizer, QAArguments(), "Question: {question}\nAnswer:", "pairs")
    return encoded.select_columns(TRAINING_COLUMNS)


def lora_model(tokenizer, loss_type=CAUSAL_LM_LOSS):
    model = build_model(ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=64), tokenizer, block_size=64)
    model.loss_type = loss_type
    return wrap_lora(model, LoraArguments(use_lora=True, lora_dropout=0.0))


def train_steps(model, dataset, collator, tmp_path, steps, learning_rate=1e-2) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
        logging_steps=1, learning_rate=learning_rate, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer


def test_lora_trains_only_adapters_and_the_merged_model_gives_the_same_logits(gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = lora_model(gpt2_tokenizer)
    rows = qa_rows(gpt2_tokenizer)
    batch = padded_collator(gpt2_tokenizer)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        base_logits = model(**batch).logits
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model, rows, padded_collator(gpt2_tokenizer), tmp_path, steps=3)
    after = dict(model.named_parameters())
    adapters = [name for name in before if "lora_" in name]
    assert len(adapters) == 2 * 4  # A and B on attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj of the one block
    assert all(not torch.equal(before[name], after[name]) for name in adapters)
    assert all(torch.equal(before[name], after[name]) for name in before if "lora_" not in name)

    model.eval()
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        merged_logits = save_merged(model, gpt2_tokenizer, str(tmp_path)).eval()(**batch).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / MERGED_DIR).eval()
        reloaded_logits = reloaded(**batch).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapters learned something
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert torch.allclose(reloaded_logits, adapter_logits, atol=1e-5)
    assert not any("lora" in name for name, _ in reloaded.named_parameters())


@pytest.mark.parametrize("loss_type", [CAUSAL_LM_LOSS, None])
def test_lora_trainer_loss_equals_the_manual_loss(loss_type, gpt2_tokenizer, tmp_path):
    """The adapter wrap keeps `loss_type`, so the Trainer divides by shifted label tokens.

    Three answer-only rows plus one row scored from its first token: there the shifted and unshifted counts differ,
    and GPT-2's default loss_type (None) would under-report (the control case).
    """
    torch.manual_seed(0)
    model = lora_model(gpt2_tokenizer, loss_type)
    assert model.get_base_model().loss_type == loss_type
    rows = qa_rows(gpt2_tokenizer).to_dict()
    rows["labels"][-1] = list(rows["input_ids"][-1])
    dataset = Dataset.from_dict(rows)
    collator = padded_collator(gpt2_tokenizer)
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        manual = manual_causal_lm_loss(model(**batch).logits, batch["labels"]).item()
    trainer = train_steps(model, dataset, collator, tmp_path, steps=1)
    logged = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    if loss_type == CAUSAL_LM_LOSS:
        assert logged == pytest.approx(manual, rel=1e-5)
    else:
        shifted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        assert logged == pytest.approx(manual * shifted / (batch["labels"] != IGNORE_INDEX).sum().item(), rel=1e-5)
        assert logged < manual * 0.99


def greedy_from_ids(model, tokenizer, ids, max_new_tokens) -> str:
    """Greedy decoding by hand: a full forward per step (no cache, no padding), argmax over real token ids only."""
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1, : len(tokenizer)].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_answers_are_generated_from_the_prompt_ids_the_row_was_trained_on(gpt2_tokenizer):
    """A prompt cut inside the two bytes of "ü" does not survive decode + encode: generation must use its ids."""
    from lmpipe.finetune import evaluate_qa

    question, answer = "café crème ü", "yes"
    prompt_ids = gpt2_tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    room = next(n for n in range(2, len(prompt_ids))
                if gpt2_tokenizer(gpt2_tokenizer.decode(prompt_ids[-n:]))["input_ids"] != prompt_ids[-n:])
    target = gpt2_tokenizer(" " + answer)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    split = Dataset.from_dict({"question": [question], "answer": [[answer]]})
    rows, counts = tokenize_qa(split, gpt2_tokenizer, QAArguments(max_length=room + len(target)),
                               "Question: {question}\nAnswer:", "pairs")
    assert counts.truncated == 1 and rows[0]["input_ids"] == prompt_ids[-room:] + target
    torch.manual_seed(0)
    model = build_model(ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=64), gpt2_tokenizer, 64).eval()
    _, predictions = evaluate_qa(model, gpt2_tokenizer, rows, max_new_tokens=6, batch_size=4, seed=0)
    assert predictions[0]["prediction"] == greedy_from_ids(model, gpt2_tokenizer, prompt_ids[-room:], 6)
    retokenised = gpt2_tokenizer(predictions[0]["prompt"])["input_ids"]
    assert retokenised != prompt_ids[-room:]  # what generating from the prompt text would have used


def test_nested_answer_column_and_context(gpt2_tokenizer, tmp_path):
    """SQuAD-style rows: `answers` is a struct, its accepted answers are reached as `answers.text`."""
    from lmpipe.finetune import prepare_qa_data

    path = tmp_path / "squad.jsonl"
    rows = [{"context": f"Passage {i}.", "question": f"Question {i}?", "answers": {"text": [f"a{i}", f"b{i}"],
             "answer_start": [0, 3]}} for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    qa = QAArguments(train_file=str(path), answer_column="answers.text", context_column="context")
    data = prepare_qa_data(qa, gpt2_tokenizer, TrainingArguments(output_dir=str(tmp_path)), "{context} {question}")
    assert len(data.train) == 9 and data.validation["answers"] == [["a9", "b9"]]
    assert data.validation["prompt"] == ["Passage 9. Question 9?"]
    answer = gpt2_tokenizer(" a9")["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert data.validation["labels"][0][-len(answer):] == answer


# --- end to end: pretrain a tiny model with lmpipe, fine-tune it on 300 real NQ-open questions -------------------

PRETRAIN = tiny_run(
    tokenizer_vocab_size=512, block_size=64, n_positions=96, n_layer=2, n_embd=64, dropout=0, max_steps=20,
    per_device_train_batch_size=8, learning_rate=0.003, warmup_steps=5, save_strategy="no", seed=1,
)
FINETUNE = [
    "--max_length", "96", "--generation_max_new_tokens", "8", "--max_steps", "30", "--learning_rate", "0.003",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--eval_strategy", "steps",
    "--eval_steps", "30", "--eval_on_start", "true", "--save_strategy", "no", "--report_to", "none",
    "--disable_tqdm", "true", "--seed", "1",
]
EXAMPLES, HELD_OUT = 300, 30


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    corpus = root / "corpus.txt"
    write_pydoc_corpus(corpus, 40)
    assert main(["pretrain", "--train_file", str(corpus), "--output_dir", str(root / "pretrained"), *PRETRAIN]) == 0
    questions = root / "nq_open_300.jsonl"
    questions.write_text("".join(NQ_OPEN.read_text(encoding="utf-8").splitlines(keepends=True)[:EXAMPLES]))
    return root


def finetune(root, name, *flags):
    output = root / name
    args = ["finetune-qa", "--model_name_or_path", str(root / "pretrained"), "--train_file",
            str(root / "nq_open_300.jsonl"), "--output_dir", str(output), *FINETUNE, *flags]
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    return output, metrics, predictions


def hand_answer_only_loss(model_dir, predictions) -> tuple[float, int]:
    """Reload the saved model; score each held-out answer (+EOS) after its prompt, one question at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in predictions:
            prompt = tokenizer(row["prompt"])["input_ids"]
            answer = tokenizer(" " + row["answers"][0])["input_ids"] + [tokenizer.eos_token_id]
            log_probs = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), dim=-1)
            for offset, token in enumerate(answer):
                total -= log_probs[len(prompt) + offset - 1, token].item()
            count += len(answer)
    return total / count, count


def check_run(metrics, predictions):
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["examples"] == {"train": {"kept": EXAMPLES - HELD_OUT, "truncated": 0, "dropped": 0},
                                   "validation": {"kept": HELD_OUT, "truncated": 0, "dropped": 0}}
    assert (metrics["train_examples"], metrics["validation_examples"], len(predictions)) == (270, 30, HELD_OUT)
    assert metrics["exact_match"] == pytest.approx(100 * sum(row["em"] for row in predictions) / HELD_OUT)
    assert metrics["f1"] == pytest.approx(100 * sum(row["f1"] for row in predictions) / HELD_OUT)
    assert all(row["prompt"] == f"Question: {row['question']}\nAnswer:" for row in predictions)


@pytest.mark.slow
def test_full_fine_tune_with_padded_batches(pretrained):
    output, metrics, predictions = finetune(pretrained, "full")
    check_run(metrics, predictions)
    loss, tokens = hand_answer_only_loss(output, predictions)
    assert metrics["eval_tokens"] == tokens
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert 0.5 < metrics["real_token_fraction"] < 1.0
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    for row in predictions[:4]:  # the saved model's own greedy answer to the prompt it was scored on
        ids = tokenizer(row["prompt"])["input_ids"]
        assert row["prediction"] == greedy_from_ids(model, tokenizer, ids, 8)


LORA_PACKED = ["--batching", "packed", "--use_lora", "true", "--lora_dropout", "0", "--learning_rate", "0.01"]


@pytest.fixture(scope="module")
def lora_packed_run(pretrained):
    return finetune(pretrained, "lora", *LORA_PACKED, "--merge_lora", "true")


@pytest.mark.slow
def test_lora_fine_tune_with_packed_batches_and_merge(lora_packed_run):
    output, metrics, predictions = lora_packed_run
    check_run(metrics, predictions)
    assert metrics["real_token_fraction"] == 1.0
    assert metrics["trainable_parameters"] < 0.2 * metrics["total_parameters"]
    assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
    loss, tokens = hand_answer_only_loss(output / MERGED_DIR, predictions)  # the merged plain model
    assert metrics["eval_tokens"] == tokens
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
def test_the_chunked_loss_and_the_models_own_give_the_same_run(pretrained, lora_packed_run):
    """LoRA on packed batches, fp32: train and eval losses with chunked_loss false equal the chunked run's."""
    _, chunked, _ = lora_packed_run
    _, own, _ = finetune(pretrained, "lora-own-loss", *LORA_PACKED, "--chunked_loss", "false")
    for key in ("train_loss", "initial_eval_loss", "eval_loss", "perplexity"):
        assert chunked[key] == pytest.approx(own[key], rel=1e-5), key
    assert chunked["eval_tokens"] == own["eval_tokens"]


BAD_INPUTS = {
    "missing column": (["--answer_column", "answers"], "nq_open_300.jsonl (train): no column 'answers'"),
    "empty answer": (["--train_file", "{root}/bad.jsonl"], "bad.jsonl row 2: answer 1 is empty"),
    "merge without lora": (["--merge_lora", "true"], "merge_lora: true needs use_lora: true"),
    "no room to generate": (["--generation_max_new_tokens", "96"], "generation_max_new_tokens=96 leaves no room"),
    "rows longer than the model": (["--max_length", "97", "--train_file", "{root}/missing.jsonl"],  # before any data
                                   "max_length=97 exceeds the model's n_positions=96"),
    "unknown target": (["--use_lora", "true", "--lora_target_modules", "q_proj"], "has no module named q_proj"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_no_finished_run(name, pretrained, tmp_path, capsys):
    (pretrained / "bad.jsonl").write_text('{"question": "q one", "answer": ["a"]}\n'
                                          '{"question": "q two", "answer": [""]}\n')
    flags, message = BAD_INPUTS[name]
    args = ["finetune-qa", "--model_name_or_path", str(pretrained / "pretrained"), "--train_file",
            str(pretrained / "nq_open_300.jsonl"), "--max_length", "64", "--output_dir", str(tmp_path / "out"),
            "--report_to", "none",
            *[flag.format(root=pretrained) for flag in flags]]
    assert main(args) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_loss_check_on_a_qa_recipe_scores_exactly_every_answer_token_and_eos(pretrained, capsys):
    """One pass over every train batch: the four losses agree and count each answer's tokens + EOS, nothing else."""
    tokenizer = AutoTokenizer.from_pretrained(pretrained / "pretrained")
    rows = [json.loads(line) for line in (pretrained / "nq_open_300.jsonl").read_text().splitlines()]
    train = rows[: EXAMPLES - HELD_OUT]  # the last 10% are held out
    answer_tokens = sum(len(tokenizer(" " + row["answer"][0])["input_ids"]) + 1 for row in train)
    assert main(["check-loss", "--task", "qa", "--model_name_or_path", str(pretrained / "pretrained"), "--train_file",
                 str(pretrained / "nq_open_300.jsonl"), "--max_length", "96", "--batches", "1000",
                 "--report_to", "none"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["all"])
    assert int(total.split()[1].replace(",", "")) == answer_tokens


@pytest.mark.slow
def test_loss_check_on_lora_with_packed_batches_compares_the_adapter_gradients(pretrained, capsys):
    """LoRA freezes lm_head/wte: the gradients compared are an adapter's and the final hidden states'."""
    assert main(["check-loss", "--task", "qa", "--model_name_or_path", str(pretrained / "pretrained"), "--train_file",
                 str(pretrained / "nq_open_300.jsonl"), "--max_length", "96", "--batches", "2",
                 "--use_lora", "true", "--batching", "packed", "--report_to", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    gradients = [line.split() for line in
                 lines[lines.index(next(header for header in lines if header.startswith("gradients"))) + 1 : -1]]
    assert [row[0] for row in gradients] == ["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight",
                                             "final"]
    assert all(float(row[-1]) <= 1e-5 for row in gradients)


def test_a_model_is_required(capsys):
    assert main(["finetune-qa", "--train_file", str(NQ_OPEN)]) == 2
    assert "model_name_or_path is required" in capsys.readouterr().err
