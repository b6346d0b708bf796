"""Zero-shot tasks scored during training (`zero_shot_tasks`): the same numbers as `lmpipe evaluate` on the saved
checkpoints, in the logs, TensorBoard, metrics.json and loss.png; bad entries stopped before any data."""

import json
import math
from pathlib import Path

import pytest
import torch

from lmpipe.cli import main, zero_shot_summary

from conftest import DATA, tiny_run, write_pydoc_corpus

CHOICE = DATA / "zero_shot" / "shakespeare_next_sentence.jsonl"
LAST_WORD = DATA / "zero_shot" / "shakespeare_last_word.jsonl"
TASKS = [
    {"task": "multiple_choice", "data": str(CHOICE), "limit": 3, "batch_size": 2},
    {"task": "lambada", "data": str(LAST_WORD), "limit": 7, "name": "last_word"},
]
NAMES = {"shakespeare_next_sentence": TASKS[0], "last_word": TASKS[1]}


def evaluate_flags(entry: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in entry.items() if key != "name"]


def evaluated(model_dir: Path, entry: dict, tmp_path: Path) -> dict:
    """`lmpipe evaluate` on a saved model: its results.json metrics."""
    out = tmp_path / f"evaluate-{model_dir.name}-{entry['task']}"
    assert main(["evaluate", str(model_dir), *evaluate_flags(entry), "--output_dir", str(out)]) == 0
    return json.loads((out / "results.json").read_text())["metrics"]


def same_metrics(in_training: dict, by_evaluate: dict) -> None:
    assert in_training.keys() == by_evaluate.keys()
    for key, value in by_evaluate.items():
        if isinstance(value, float) and not math.isfinite(value):
            assert in_training[key] is None or not math.isfinite(in_training[key])
        elif key in ("acc", "acc_norm", "chance"):
            assert in_training[key] == value, key
        else:
            assert in_training[key] == pytest.approx(value, rel=1e-6), key


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two evaluations (steps 4 and 8), each saved; with document attention, whose saved model must still be the
    plain GPT-2 that `lmpipe evaluate` loads."""
    root = tmp_path_factory.mktemp("zero-shot-training")
    corpus = write_pydoc_corpus(root / "corpus.txt", 30)
    output = root / "run"
    flags = tiny_run(n_positions=128, tokenizer_vocab_size=512, max_steps=8, eval_strategy="steps", eval_steps=4,
                     save_steps=4, logging_steps=4, learning_rate=0.01, report_to="tensorboard",
                     document_attention=True, seed=5)
    tasks = [json.dumps(entry) for entry in TASKS]
    assert main(["pretrain", "--train_file", str(corpus), "--output_dir", str(output), *flags,
                 "--zero_shot_tasks", *tasks]) == 0
    return output


@pytest.mark.slow  # a tiny pretraining run with two evaluations, then four `lmpipe evaluate` runs
def test_in_training_scores_are_lmpipe_evaluates_on_each_checkpoint(run, tmp_path):
    """Step 4's logged scores equal `lmpipe evaluate` on checkpoint-4, the final ones (metrics.json) on the saved
    model; the two differ, so each evaluation scored the model of its own step."""
    history = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    at_4 = next(row for row in history if row["step"] == 4 and "eval_loss" in row)
    final = json.loads((run / "metrics.json").read_text())["zero_shot"]
    assert final.keys() == NAMES.keys()
    for name, entry in NAMES.items():
        logged = {key.split("/")[2]: value for key, value in at_4.items() if key.startswith(f"eval_zero_shot/{name}/")}
        same_metrics(logged, evaluated(run / "checkpoint-4", entry, tmp_path))
        same_metrics(final[name], evaluated(run, entry, tmp_path))
    assert final["last_word"]["perplexity"] != pytest.approx(at_4["eval_zero_shot/last_word/perplexity"], rel=1e-3)


@pytest.mark.slow
def test_scores_reach_tensorboard_and_a_third_panel_of_the_plot(run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "runs").iterdir()))).Reload()
    for name in NAMES:
        assert [event.step for event in events.Scalars(f"eval/zero_shot/{name}/acc")] == [4, 8]
    assert Image.open(run / "loss.png").size == (1500, 400)  # three panels of 5 x 4 inches at 100 dpi


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"task": "multiple_choice", "data": str(CHOICE), "limt": 3}, "zero_shot_tasks[2]: unknown key 'limt'"),
        ({"task": "multiple_choice"}, "zero_shot_tasks[2]: needs a data"),
        ({"task": "lambada", "data": str(CHOICE)}, "zero_shot_tasks[2]: " + str(CHOICE) + " row 1: no column 'text'"),
        ({"task": "mc", "data": str(CHOICE)}, "zero_shot_tasks[2]: task must be one of multiple_choice, lambada"),
        ({"task": "multiple_choice", "data": str(CHOICE), "limit": 0}, "zero_shot_tasks[2]: limit must be >= 1"),
        ({"task": "lambada", "data": str(LAST_WORD)}, "zero_shot_tasks[2]: name 'shakespeare_last_word' is already"),
    ],
)
def test_a_bad_entry_stops_the_run_before_any_data(tmp_path, capsys, monkeypatch, entry, message):
    import lmpipe.pretrain

    def no_data(*args):
        raise AssertionError("the corpus was read before the zero-shot tasks were checked")

    monkeypatch.setattr(lmpipe.pretrain, "prepare_corpus", no_data)
    first = json.dumps({"task": "lambada", "data": str(LAST_WORD)})
    flags = ["--output_dir", str(tmp_path / "out"), "--zero_shot_tasks", first, json.dumps(entry)]
    assert main(["pretrain", *flags, *tiny_run()]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_final_scores_are_printed_in_one_line():
    metrics = {"zero_shot": {"mc": {"acc": 0.5, "acc_stderr": None, "chance": 0.25}, "lw": {"acc": 0.0},
                             "ppl": {"token_perplexity": 12.345, "bits_per_byte": 1.0}}}
    expected = "\nzero-shot: mc acc 0.500 (chance 0.250) | lw acc 0.000 | ppl token perplexity 12.35"
    assert zero_shot_summary(metrics) == expected
    assert zero_shot_summary({"eval_loss": 1.0}) == ""


def test_a_lora_model_is_scored_with_its_adapters_and_keeps_its_mode(gpt2_tokenizer):
    """A peft model (fine-tuning with use_lora) is scored through its base model, adapters active: the scores of the
    merged model, not of the base weights; dropout comes back on afterwards."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmpipe.training.zero_shot_tasks import prepare_zero_shot_tasks, score_zero_shot_tasks

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2)
    base = GPT2LMHeadModel(config)
    lora = LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), lora).train()
    tasks = prepare_zero_shot_tasks([json.dumps({"task": "lambada", "data": str(LAST_WORD), "limit": 3})], model,
                                    gpt2_tokenizer)
    scores = score_zero_shot_tasks(model, tasks)
    assert model.get_base_model().training
    merged = score_zero_shot_tasks(copy.deepcopy(model).merge_and_unload(), tasks)
    key = "zero_shot/shakespeare_last_word/perplexity"
    assert scores[key] == pytest.approx(merged[key], rel=1e-5)
    assert scores[key] != pytest.approx(score_zero_shot_tasks(base, tasks)[key], rel=1e-3)


def test_check_loss_evaluates_nothing_so_leaves_the_tasks_alone(tmp_path, text_file):
    """`lmpipe check-loss` builds the recipe's Trainer but never evaluates: a task whose file is gone (a run directory
    checked elsewhere) does not stop it."""
    gone = json.dumps({"task": "lambada", "data": str(tmp_path / "gone.jsonl")})
    flags = ["--train_file", str(text_file), *tiny_run(max_steps=1), "--zero_shot_tasks", gone, "--batches", "1"]
    assert main(["check-loss", *flags]) == 0


@pytest.mark.slow
def test_a_document_attention_run_saves_a_plain_gpt2(run):
    from transformers import GPT2LMHeadModel

    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and not any("document" in key for key in config)
    assert isinstance(GPT2LMHeadModel.from_pretrained(run), GPT2LMHeadModel)
