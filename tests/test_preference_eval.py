"""benchmarks/preference_eval.py: its answer log-probabilities against the model's own loss row by row, and its
accuracies on cases whose answer is known (a policy equal to its reference; every pair beside its swapped copy)."""

import importlib.util
import json

import pytest
import torch

from lmpipe.config.arguments import ModelArguments
from lmpipe.model.build import build_model

from conftest import REPO

spec = importlib.util.spec_from_file_location("preference_eval", REPO / "benchmarks" / "preference_eval.py")
preference_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preference_eval)

POSITIONS = 48
PROMPTS = ["Question: who wrote hamlet\nAnswer:", "Question: when did the berlin wall fall\nAnswer:",
           "Question: " + "why " * 60 + "\nAnswer:"]  # the last is cut from the left to fit 48 positions
ANSWERS = [" William Shakespeare", " 1989", " because"]


def tiny_model(tokenizer, seed: int):
    torch.manual_seed(seed)
    model_args = ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=POSITIONS)
    return build_model(model_args, tokenizer, POSITIONS).eval()


def test_answer_log_probs_equal_the_models_loss_on_each_row_alone(gpt2_tokenizer):
    model = tiny_model(gpt2_tokenizer, seed=0)
    log_probs, counts = preference_eval.answer_log_probs(model, gpt2_tokenizer, PROMPTS, ANSWERS, batch_size=2)
    for prompt, answer, log_prob, count in zip(PROMPTS, ANSWERS, log_probs, counts):
        target = gpt2_tokenizer.encode(answer) + [gpt2_tokenizer.eos_token_id]  # the answer's EOS (= pad) is scored
        prompt_ids = gpt2_tokenizer.encode(prompt)[-(POSITIONS - len(target)) :]
        ids = torch.tensor([prompt_ids + target])
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100  # by position, not by id
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        assert count == len(target)
        assert log_prob == pytest.approx(-loss.item() * len(target), rel=1e-5)


def test_implicit_reward_by_hand():
    policy = {"chosen": [-1.0, -5.0, -2.0], "rejected": [-4.0, -1.0, -3.0]}
    reference = {"chosen": [-2.0, -5.0, -2.0], "rejected": [-2.0, -2.0, -3.0]}  # margins 0.1*3, 0.1*-1, 0
    reward = preference_eval.implicit_reward(policy, reference, beta=0.1)
    assert reward["accuracy"] == pytest.approx(1 / 3)  # the tie is not a win
    assert reward["mean_margin"] == pytest.approx(0.2 / 3)


@pytest.mark.slow
def test_known_accuracies_end_to_end(gpt2_tokenizer, tmp_path, capsys):
    for name, seed in (("sft", 0), ("dpo", 1)):
        tiny_model(gpt2_tokenizer, seed).save_pretrained(tmp_path / name)
        gpt2_tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "dpo" / "recipe.yaml").write_text(f"model_name_or_path: {tmp_path / 'sft'}\nbeta: 0.5\n")
    questions = [p.removeprefix("Question: ").removesuffix("\nAnswer:") for p in PROMPTS[:2]]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": [a.strip()]}) + "\n"
                                               for q, a in zip(questions, ANSWERS)))
    pairs = [{"prompt": PROMPTS[0], "chosen": ANSWERS[0], "rejected": " Mark Twain"},
             {"prompt": PROMPTS[1], "chosen": ANSWERS[1], "rejected": " 1066"}]
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs + swapped))

    def run(*flags) -> dict:
        assert preference_eval.main(["--pairs", str(tmp_path / "pairs.jsonl"), "--answers", str(tmp_path / "qa.jsonl"),
                                     "--max_new_tokens", "4", *flags]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    same = run("--policy", str(tmp_path / "sft"), "--reference", str(tmp_path / "sft"))
    assert same["implicit_reward"] == {"accuracy": 0.0, "mean_margin": 0.0}  # every margin a tie
    result = run("--policy", str(tmp_path / "dpo"))  # the reference and beta from its recipe.yaml
    assert result["beta"] == 0.5 and result["models"]["reference"]["model"] == str(tmp_path / "sft")
    assert result["implicit_reward"]["accuracy"] == 0.5 and result["implicit_reward"]["mean_margin"] == pytest.approx(
        0.0, abs=1e-9)  # each pair's margin is minus its swapped copy's
    assert result["models"]["policy"]["chosen_preferred"] == 0.5
    assert result["models"]["reference"]["answer_perplexity"] == same["models"]["policy"]["answer_perplexity"]
