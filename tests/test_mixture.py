"""Weighted mixtures: realised shares against the weights (3:1 gives 75 % / 25 %), seeded subsampling, per-source
errors, and one recipe key parsed from YAML exactly as from the command line."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from lmpipe.config.arguments import FINETUNE_QA_GROUPS, QAArguments
from lmpipe.config.recipe import parse_recipe
from lmpipe.data.chat import DEFAULT_CHAT_TEMPLATE, chat_format
from lmpipe.data.mixture import parse_sources, prepare_mixture, weighted_indices
from lmpipe.errors import LmpipeError

from conftest import count_by_source, mixed_stream_by_hand, shakespeare_lines, tiny_run, write_lines


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
    tokens = {name: sum(sum(label != -100 for label in labels) for labels, s in zip(mixture.train["labels"],
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
    "zero weight": ([{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 0}],
                    "datasets[2]: weight must be a number > 0"),
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
    from_yaml = parse_recipe([str(recipe)], groups=FINETUNE_QA_GROUPS).data.datasets
    from_flags = parse_recipe(["--datasets", '{"path": "a.jsonl", "weight": 3}',
                               '{"path": "b.jsonl", "split": "train[:50%]"}'],
                              groups=FINETUNE_QA_GROUPS).data.datasets
    assert parse_sources(from_yaml) == parse_sources(from_flags)
    assert [(s.path, s.weight, s.split) for s in parse_sources(from_yaml)] == [("a.jsonl", 3.0, "train"),
                                                                               ("b.jsonl", 1.0, "train[:50%]")]


def test_a_pretraining_mixture_weights_documents_and_counts_their_tokens(gpt2_files, gpt2_tokenizer, tmp_path):
    from transformers import TrainingArguments

    from lmpipe.config.arguments import DataArguments, ModelArguments, TokenizerArguments
    from lmpipe.data.sources import pydoc_documents
    from lmpipe.pretrain import prepare_corpus

    documents = pydoc_documents()[:40]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents[:20]), encoding="utf-8")
    b.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in documents[20:]), encoding="utf-8")
    data = DataArguments(datasets=[{"path": str(a), "weight": 3}, {"path": str(b), "text_column": "body"}],
                         block_size=64)
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


# Streaming mixtures: real text, one short line per document, so a few trained blocks hold many documents.
def pydoc_lines(count):
    from lmpipe.data.sources import pydoc_documents

    return [line for doc in pydoc_documents() for line in doc.splitlines() if line.strip()][:count]


def streaming_sources(tmp_path, rows=(400, 400)):
    """A Shakespeare file (column text, weight 3) and a Python-docs file (column body, weight 1)."""
    a = write_lines(tmp_path / "a.jsonl", shakespeare_lines(rows[0]))
    b = write_lines(tmp_path / "b.jsonl", pydoc_lines(rows[1]), "body")
    return a, b, [{"path": a, "weight": 3}, {"path": b, "weight": 1, "text_column": "body"}]


def test_a_streaming_3_to_1_mixture_draws_75_and_25_percent_of_documents_seeded(tmp_path):
    from lmpipe.config.arguments import DataArguments
    from lmpipe.data.stream_mixture import stream_mixture

    a = write_lines(tmp_path / "a.jsonl", [f"a {i}" for i in range(4000)])
    b = write_lines(tmp_path / "b.jsonl", [f"b {i}" for i in range(1000)], "body")
    data = DataArguments(datasets=[{"path": a, "weight": 3}, {"path": b, "weight": 1, "text_column": "body"}],
                         streaming=True, streaming_validation_documents=10)
    mixture = stream_mixture(data, seed=0)
    head = [row["source"] for row in mixture.train.take(2000)]
    # Each document is drawn from a with p = 0.75: over 2,000 draws the share's standard deviation is
    # sqrt(0.75 * 0.25 / 2000) = 0.97 points; 4 of them (3.9 points) fail a fair draw once in ~16,000 seeds.
    assert abs(head.count(a) / 2000 - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 2000)
    assert mixture.validation["text"] == [f"a {i}" for i in range(10)] + [f"b {i}" for i in range(10)]
    assert mixture.validation["source"] == [a] * 10 + [b] * 10
    # all_exhausted: one pass reads every train document of a once; b, drawn out first, starts again
    texts = Counter(row["text"] for row in mixture.train)
    assert {text: n for text, n in texts.items() if text.startswith("a")} == {f"a {i}": 1 for i in range(10, 4000)}
    assert {text for text in texts if text.startswith("b")} == {f"b {i}" for i in range(10, 1000)}
    assert sum(n for text, n in texts.items() if text.startswith("b")) > 990
    assert [row["source"] for row in stream_mixture(data, seed=0).train.take(2000)] == head
    assert [row["source"] for row in stream_mixture(data, seed=1).train.take(2000)] != head
    data.max_train_documents = 100  # of the mixed train stream
    assert ([row["text"] for row in stream_mixture(data, seed=0).train]
            == [row["text"] for row in mixture.train.take(100)])


def test_the_shares_of_a_stream_count_the_documents_of_the_blocks_the_packer_cuts(tmp_path, gpt2_tokenizer):
    """Against the stream rebuilt by hand, for a head of blocks and for more blocks than one pass holds."""
    from lmpipe.config.arguments import DataArguments
    from lmpipe.data.stream_mixture import stream_mixture, trained_shares
    from lmpipe.data.streaming import PackedStream

    a, b, sources = streaming_sources(tmp_path, rows=(60, 30))
    data = DataArguments(datasets=sources, streaming=True, streaming_validation_documents=5)
    mixture = stream_mixture(data, seed=7)
    tokens, ids = mixed_stream_by_hand([(a, "text"), (b, "body")], (3, 1), 5, 7, gpt2_tokenizer)
    blocks = [row["input_ids"].tolist() for row in PackedStream(mixture.train, gpt2_tokenizer, "text", 16)]
    assert np.array_equal(np.asarray(blocks).reshape(-1), ids[: len(blocks) * 16])  # what the Trainer is fed
    whole = len(blocks)
    for trained in (whole // 3, 2 * whole + 5):
        passes, rest = divmod(trained, whole)
        documents, counted = count_by_source(tokens[: rest * 16])
        pass_documents, pass_tokens = count_by_source(tokens[: whole * 16])
        for name in (a, b):
            documents[name] += passes * pass_documents[name]
            counted[name] += passes * pass_tokens[name]
        shares = trained_shares(mixture, gpt2_tokenizer, "text", 16, trained)
        assert {name: (s["examples"], s["learned_tokens"]) for name, s in shares.items()} == {
            name: (documents[name], counted[name]) for name in (a, b)}
        assert sum(s["learned_tokens"] for s in shares.values()) == trained * 16
        assert shares[a]["example_share"] == pytest.approx(documents[a] / (documents[a] + documents[b]))


@pytest.mark.slow
def test_a_streaming_mixture_run_writes_the_shares_of_what_it_trained(tmp_path, gpt2_files, gpt2_tokenizer, capsys):
    """5 steps of 4 blocks of 64 tokens from the CLI; metrics.json's shares equal the stream rebuilt by hand."""
    from lmpipe.cli import main

    a, b, sources = streaming_sources(tmp_path)
    output = tmp_path / "out"
    flags = tiny_run(train_tokenizer=False, tokenizer_vocab_size=None, block_size=64, n_positions=64,
                     vocab_file=gpt2_files[0], merges_file=gpt2_files[1], eval_strategy="no", save_strategy="no",
                     output_dir=output)
    assert main(["pretrain", "--datasets", *map(json.dumps, sources), "--streaming", "true",
                 "--streaming_validation_documents", "20", "--seed", "3", "--max_steps", "5", *flags]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train_tokens"] == 5 * 4 * 64
    tokens, _ = mixed_stream_by_hand([(a, "text"), (b, "body")], (3, 1), 20, 3, gpt2_tokenizer)
    documents, counted = count_by_source(tokens[: 5 * 4 * 64])
    assert {name: (s["examples"], s["learned_tokens"]) for name, s in metrics["mixture"].items()} == {
        name: (documents[name], counted[name]) for name in (a, b)}
    assert {name: s["weight"] for name, s in metrics["mixture"].items()} == {a: 3.0, b: 1.0}
    out = capsys.readouterr().out
    assert out.count("mixture: ") == 1 and "(the documents of the 20 trained blocks)" in out
    assert f"{a} (weight 3): {documents[a]} examples {documents[a] / sum(documents.values()):.1%}" in out


def test_one_streamed_source_is_the_plain_streaming_run(tmp_path, gpt2_files):
    """`datasets:` with one source and `train_file` give the same validation, train blocks and baseline head."""
    from transformers import TrainingArguments

    from lmpipe.config.arguments import DataArguments, ModelArguments, TokenizerArguments
    from lmpipe.data.packing import blocks_as_array
    from lmpipe.pretrain import prepare_corpus

    path = write_lines(tmp_path / "a.jsonl", shakespeare_lines(300))
    tokenizer = TokenizerArguments(vocab_file=gpt2_files[0], merges_file=gpt2_files[1])
    training = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1)
    corpora = [prepare_corpus(DataArguments(streaming=True, streaming_validation_documents=20, block_size=32, **source),
                              tokenizer, ModelArguments(), training)
               for source in ({"train_file": path}, {"datasets": [{"path": path, "weight": 2.5}]})]
    plain, mixed = ([row["input_ids"].tolist() for row in corpus.train] for corpus in corpora)
    assert mixed == plain and len(plain) > 50
    assert np.array_equal(blocks_as_array(corpora[0].validation), blocks_as_array(corpora[1].validation))
    assert np.array_equal(corpora[0].train_ids, corpora[1].train_ids)


def write_bad_row(path, bad_row='{"text": "cut off'):
    """Line 201 of 300, past the 20 held-out documents and the first train document, which are checked at once."""
    lines = [f'{{"text": "document {i} of the stream"}}' for i in range(300)]
    lines[200] = bad_row
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_bad_row_past_the_head_of_a_streamed_source_is_named_when_the_packer_reaches_it(tmp_path, gpt2_tokenizer):
    """A null text parses (bad JSON fails at once, in the chunk the heads read): it is met only by the packer."""
    from lmpipe.config.arguments import DataArguments
    from lmpipe.data.stream_mixture import MIXTURE_NAME, stream_mixture
    from lmpipe.data.streaming import PackedStream

    a, _, _ = streaming_sources(tmp_path)
    write_bad_row(tmp_path / "bad.jsonl", '{"text": null}')
    data = DataArguments(datasets=[{"path": a}, {"path": str(tmp_path / "bad.jsonl")}], streaming=True,
                         streaming_validation_documents=20)
    mixture = stream_mixture(data, seed=0)  # the heads read well
    with pytest.raises(LmpipeError) as error:
        list(PackedStream(mixture.train, gpt2_tokenizer, "text", 64, MIXTURE_NAME, mixture.files))
    assert str(error.value) == f"datasets[2]: {tmp_path}/bad.jsonl: line 201: column 'text' holds NoneType, not text"


STREAMING_BAD_SOURCES = {
    "missing file": ('{"path": "%s/missing.jsonl"}', "datasets[2]: {tmp}/missing.jsonl: data file not found"),
    "missing column": ('{"path": "%s/b.jsonl"}',
                       "datasets[2]: {tmp}/b.jsonl (validation): no column 'text'; columns are body"),
    "zero weight": ('{"path": "%s/b.jsonl", "weight": 0, "text_column": "body"}',
                    "datasets[2]: weight must be a number > 0, got 0"),
    "bad JSON row": ('{"path": "%s/bad.jsonl"}', "datasets[2]: {tmp}/bad.jsonl: line 201 is not valid JSON"),
    "too few documents": ('{"path": "%s/short.jsonl"}',
                          "datasets[2]: {tmp}/short.jsonl: no training documents left after holding out 20"),
}


@pytest.mark.parametrize("name", STREAMING_BAD_SOURCES)
def test_a_bad_streamed_source_is_one_line_naming_it(name, tmp_path, capsys):
    from lmpipe.cli import main

    a, _, _ = streaming_sources(tmp_path)
    write_bad_row(tmp_path / "bad.jsonl")
    write_lines(tmp_path / "short.jsonl", pydoc_lines(20))
    second, message = STREAMING_BAD_SOURCES[name]
    output = tmp_path / "out"
    code = main(["pretrain", "--datasets", json.dumps({"path": a}), second % tmp_path, "--streaming", "true",
                 "--streaming_validation_documents", "20", "--max_steps", "2", "--output_dir", str(output),
                 "--report_to", "none"])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last_line.startswith("error: " + message.format(tmp=tmp_path))
    assert not (output / "metrics.json").exists()


def test_a_streamed_mixture_needs_the_trainers_token_count(tmp_path, capsys):
    from lmpipe.cli import main

    _, _, sources = streaming_sources(tmp_path, rows=(40, 40))
    assert main(["pretrain", "--datasets", *map(json.dumps, sources), "--streaming", "true", "--max_steps", "2",
                 "--include_num_input_tokens_seen", "no", "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: datasets: a streamed mixture counts its trained blocks from the Trainer's input tokens; "
        "set include_num_input_tokens_seen: true, got 'no'")


def test_question_answer_fine_tuning_refuses_streaming_in_one_line(capsys):
    from lmpipe.cli import main

    assert main(["finetune-qa", "--streaming", "true", "--max_steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: unknown option --streaming: only pretraining streams; QA and conversation data are read in memory")
