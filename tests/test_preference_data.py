"""The shipped NQ-open preference pairs: rebuilt byte for byte by their script, split the way the SFT recipe splits,
prompted exactly as fine-tuning prompts, never rejecting a right answer; and every data file's README checksum."""

import hashlib
import json
import re
import runpy

import pytest

from lmpipe.config.arguments import FINETUNE_QA_GROUPS
from lmpipe.config.recipe import parse_recipe
from lmpipe.data.qa import prompt_template
from lmpipe.finetune import prepare_qa_data
from lmpipe.model.tokenizer import plain_text_ids
from lmpipe.training.qa_scores import score_predictions

from conftest import DATA, REPO

TRAIN, HELD_OUT = DATA / "nq_open_preferences.jsonl", DATA / "nq_open_preferences_heldout.jsonl"


def pairs(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_shipped_pairs_are_what_the_script_writes():
    builder = runpy.run_path(str(DATA / "build_nq_preferences.py"))
    assert (TRAIN.read_text(encoding="utf-8"), HELD_OUT.read_text(encoding="utf-8")) == builder["render"]()
    for row in pairs(TRAIN) + pairs(HELD_OUT):
        assert list(row) == ["prompt", "chosen", "rejected"] and all(isinstance(v, str) for v in row.values())


@pytest.fixture(scope="module")
def sft_data(gpt2_tokenizer):
    """The shipped SFT recipe's train and validation examples, as `lmpipe finetune-qa` builds them."""
    recipe = parse_recipe([str(REPO / "recipes" / "finetune" / "nq_open.yaml"), "--report_to", "none"],
                          groups=FINETUNE_QA_GROUPS)
    recipe.data.train_file = str(REPO / recipe.data.train_file)
    return prepare_qa_data(recipe.data, gpt2_tokenizer, recipe.training, prompt_template(recipe.data))


def test_pairs_are_sft_training_questions_prompted_as_in_fine_tuning(sft_data, gpt2_tokenizer):
    sft_train = dict(zip(sft_data.train["prompt"], sft_data.train["input_ids"]))
    sft_validation = set(sft_data.validation["prompt"])
    train, held_out = pairs(TRAIN), pairs(HELD_OUT)
    assert len(held_out) == 200 and len(train) + len(held_out) == len(sft_train) and len(sft_validation) == 180
    train_prompts, held_out_prompts = {p["prompt"] for p in train}, {p["prompt"] for p in held_out}
    assert not train_prompts & held_out_prompts and not (train_prompts | held_out_prompts) & sft_validation
    for pair in train + held_out:  # the SFT example is the pair's prompt and chosen answer, tokenised apart, + EOS
        prompt_ids, chosen_ids = plain_text_ids(gpt2_tokenizer, [pair["prompt"], pair["chosen"]])
        assert sft_train[pair["prompt"]] == prompt_ids + chosen_ids + [gpt2_tokenizer.eos_token_id]


def test_rejected_answers_are_wrong_and_of_the_answer_kind():
    source = {f"Question: {row['question']}\nAnswer:": row["answer"]
              for row in map(json.loads, (DATA / "nq_open_efficientqa_dev.jsonl").read_text().splitlines())}
    for path in (TRAIN, HELD_OUT):
        rows = pairs(path)
        assert all(p["chosen"] == " " + source[p["prompt"]][0] for p in rows)
        wrong = score_predictions([p["rejected"] for p in rows], [source[p["prompt"]] for p in rows])
        assert wrong["exact_match"] == 0.0  # what the QA exact match calls wrong, against every accepted answer
        years = [p for p in rows if re.fullmatch(r" \d{4}", p["chosen"])]
        assert years and all(re.fullmatch(r" \d{4}", p["rejected"]) for p in years)
    held_out_answers = {p["chosen"] for p in pairs(HELD_OUT)}  # rejected drawn within each file
    assert {p["rejected"] for p in pairs(HELD_OUT)} <= held_out_answers


def test_every_data_file_has_its_checksum_in_the_readme():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*?\| `([0-9a-f]{64})` \|", readme, re.MULTILINE))
    shipped = [p for p in DATA.rglob("*") if p.suffix in (".jsonl", ".txt")]
    assert {str(p.relative_to(DATA)) for p in shipped} == set(listed)
    for path in shipped:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[str(path.relative_to(DATA))], path.name
