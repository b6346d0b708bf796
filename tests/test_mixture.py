"""Weighted mixtures: realised shares against the weights (3:1 gives 75 % / 25 %), seeded subsampling, per-source
errors, and one recipe key parsed from YAML exactly as from the command line."""

import json
from collections import Counter

import pytest

from lmpipe.data.chat import DEFAULT_CHAT_TEMPLATE, chat_format
from lmpipe.data.mixture import parse_sources, prepare_mixture, weighted_indices
from lmpipe.errors import LmpipeError
from lmpipe.recipe import FINETUNE_QA_ARGUMENTS, QAArguments, parse_recipe


def write_qa(path, prefix, rows, question="question", answer="answer"):
    path.write_text("".join(json.dumps({question: f"{prefix} question {i}?", answer: [f"{prefix}{i}"]}) + "\n"
                            for i in range(rows)))
    return str(path)


def write_chats(path, prefix, rows):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{prefix} {i}?"},
                                                     {"role": "assistant", "content": f"{prefix}{i}"}]}) + "\n"
                            for i in range(rows)))
    return str(path)


def test_weights_3_to_1_realise_75_and_25_percent_of_examples(gpt2_tokenizer, tmp_path):
    a, b = write_qa(tmp_path / "a.jsonl", "a", 40), write_qa(tmp_path / "b.jsonl", "b", 40, "q", "answers")
    qa = QAArguments(datasets=[{"path": a, "weight": 3}, {"path": b, "weight": 1, "question_column": "q",
                                                             "answer_column": "answers"}])
    mixture = prepare_mixture(qa, gpt2_tokenizer, None, seed=1)
    counts = Counter(mixture.train["source"])
    assert counts == {a: 3 * 36, b: 36}  # each source holds out its last 10% (4 rows), then is weighted
    assert mixture.shares[a]["example_share"] == 0.75 and mixture.shares[b]["example_share"] == 0.25
    tokens = {name: sum(sum(l != -100 for l in labels) for labels, s in zip(mixture.train["labels"],
              mixture.train["source"]) if s == name) for name in (a, b)}
    assert mixture.shares[a]["learned_tokens"] == tokens[a]
    assert mixture.shares[a]["learned_token_share"] == pytest.approx(tokens[a] / (tokens[a] + tokens[b]))
    assert Counter(mixture.validation["source"]) == {a: 4, b: 4}
    assert sorted(mixture.validation["question"]) == sorted([f"a question {i}?" for i in range(36, 40)] +
                                                            [f"b question {i}?" for i in range(36, 40)])


def test_fractional_weights_subsample_without_replacement_seeded(gpt2_tokenizer, tmp_path):
    a, b = write_chats(tmp_path / "a.jsonl", "a", 20), write_chats(tmp_path / "b.jsonl", "b", 20)
    qa = QAArguments(messages_column="messages", datasets=[{"path": a, "weight": 1.5}, {"path": b, "weight": 0.5}])
    chat = chat_format(gpt2_tokenizer, DEFAULT_CHAT_TEMPLATE)
    mixture = prepare_mixture(qa, gpt2_tokenizer, chat, seed=3)
    assert Counter(mixture.train["source"]) == {a: 18 + 9, b: 9}
    assert mixture.shares[a]["example_share"] == 0.75
    again = prepare_mixture(qa, gpt2_tokenizer, chat, seed=3)
    assert again.train["input_ids"] == mixture.train["input_ids"]
    b_rows = [ids for ids, s in zip(mixture.train["input_ids"], mixture.train["source"]) if s == b]
    assert len({tuple(ids) for ids in b_rows}) == 9  # a sample without replacement


@pytest.mark.parametrize("rows,weight", [(10, 0.25), (7, 2.5), (100, 1 / 3)])
def test_a_source_gives_round_weight_times_rows_examples(rows, weight):
    indices = weighted_indices(rows, weight, seed=0)
    assert len(indices) == int(weight) * rows + round((weight % 1) * rows)
    assert abs(len(indices) - rows * weight) <= 0.5 and max(Counter(indices).values()) <= int(weight) + 1


BAD_SOURCES = {
    "unknown key": ([{"path": "a.jsonl", "wieght": 2}], "datasets[1]: unknown key 'wieght'"),
    "no path": ([{"weight": 2}], "datasets[1]: needs a path"),
    "zero weight": ([{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 0}], "datasets[2]: weight must be a number > 0"),
    "twice": ([{"path": "a.jsonl"}, {"path": "a.jsonl", "weight": 2}], "datasets: a.jsonl is listed twice"),
}


@pytest.mark.parametrize("name", BAD_SOURCES)
def test_a_bad_source_is_named(name):
    sources, message = BAD_SOURCES[name]
    with pytest.raises(LmpipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_sources(sources)


def test_a_mixture_of_conversations_and_qa_pairs_is_refused(gpt2_tokenizer, tmp_path):
    a, b = write_chats(tmp_path / "a.jsonl", "a", 20), write_qa(tmp_path / "b.jsonl", "b", 20)
    qa = QAArguments(messages_column="messages", datasets=[{"path": a}, {"path": b, "messages_column": ""}])
    with pytest.raises(LmpipeError, match=r"datasets\[2\]: .*b.jsonl is not the recipe's kind"):
        prepare_mixture(qa, gpt2_tokenizer, chat_format(gpt2_tokenizer, DEFAULT_CHAT_TEMPLATE), seed=0)


def test_yaml_sources_parse_like_command_line_json(tmp_path):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("datasets:\n  - path: a.jsonl\n    weight: 3\n  - {path: b.jsonl, split: 'train[:50%]'}\n")
    from_yaml = parse_recipe([str(recipe)], types=FINETUNE_QA_ARGUMENTS).arguments[2].datasets
    from_flags = parse_recipe(["--datasets", '{"path": "a.jsonl", "weight": 3}', '{"path": "b.jsonl", "split": "train[:50%]"}'],
                              types=FINETUNE_QA_ARGUMENTS).arguments[2].datasets
    assert parse_sources(from_yaml) == parse_sources(from_flags)
    assert [(s.path, s.weight, s.split) for s in parse_sources(from_yaml)] == [("a.jsonl", 3.0, "train"),
                                                                               ("b.jsonl", 1.0, "train[:50%]")]


def test_a_pretraining_mixture_weights_documents_and_counts_their_tokens(gpt2_files, gpt2_tokenizer, tmp_path):
    from transformers import TrainingArguments

    from lmpipe.data.sources import pydoc_documents
    from lmpipe.pretrain import prepare_corpus
    from lmpipe.recipe import DataArguments, ModelArguments, TokenizerArguments

    documents = pydoc_documents()[:40]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents[:20]), encoding="utf-8")
    b.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in documents[20:]), encoding="utf-8")
    data = DataArguments(datasets=[{"path": str(a), "weight": 3}, {"path": str(b), "text_column": "body"}], block_size=64)
    corpus = prepare_corpus(data, TokenizerArguments(vocab_file=gpt2_files[0], merges_file=gpt2_files[1]),
                            ModelArguments(), TrainingArguments(output_dir=str(tmp_path / "out")))
    tokens = [len(gpt2_tokenizer(doc, split_special_tokens=True)["input_ids"]) + 1 for doc in documents]
    shares = corpus.mixture
    assert (shares[str(a)]["examples"], shares[str(b)]["examples"]) == (3 * 18, 18)  # 2 of 20 held out each
    assert shares[str(a)]["example_share"] == 0.75
    assert shares[str(a)]["learned_tokens"] == 3 * sum(tokens[:18])
    assert shares[str(b)]["learned_tokens"] == sum(tokens[20:38])
    assert len(corpus.train_ids) == 3 * sum(tokens[:18]) + sum(tokens[20:38])
    assert corpus.validation.num_rows == (sum(tokens[18:20]) + sum(tokens[38:40])) // 64


def test_a_streaming_mixture_is_refused_in_one_line(tmp_path):
    from transformers import TrainingArguments

    from lmpipe.pretrain import prepare_corpus
    from lmpipe.recipe import DataArguments, ModelArguments, TokenizerArguments

    data = DataArguments(datasets=[{"path": "a.txt"}], streaming=True)
    with pytest.raises(LmpipeError, match="streaming mixtures are not built"):
        prepare_corpus(data, TokenizerArguments(train_tokenizer=True), ModelArguments(),
                       TrainingArguments(output_dir=str(tmp_path)))
