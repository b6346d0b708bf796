"""`lmpipe evaluate`: requests split as lm-evaluation-harness splits them, packed scoring against one forward pass
per choice, metrics against hand computations, adapters, outputs and bad rows."""

import hashlib
import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmpipe.cli import main
from lmpipe.zero_shot.data import arc_row, detect_format, hellaswag_row, piqa_row
from lmpipe.zero_shot.requests import Request, choice_request, encode_pair, rolling_windows
from lmpipe.zero_shot.scoring import score_requests

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "then", "ran", "away", "quickly", "slowly", "big",
         "small", "house", ",", ".", ";"]
EOS = 50256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    """A random 2-layer GPT-2 with the real GPT-2 BPE and 48 positions, saved as lmpipe saves models."""
    root = tmp_path_factory.mktemp("zero_shot")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=48, n_embd=32, n_layer=2, n_head=2))
    model.save_pretrained(root / "model")
    gpt2_tokenizer.save_pretrained(root / "model")
    return root, model.eval(), gpt2_tokenizer


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def choice_rows(n: int, seed: int) -> list[dict]:
    """Contexts of 1 to 60 words (some longer than the model's 48 positions, some ending in a space) and 2-5 choices
    of 1 to 8 words (one-token choices included)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = [sentence(rng, 1, 8) for _ in range(rng.randint(2, 5))]
        rows.append({"context": sentence(rng, 1, 60) + (" " if i % 4 == 0 else ""), "choices": choices,
                     "label": rng.randrange(len(choices))})
    return rows


def one_forward_per_choice(model, context: list[int], continuation: list[int], max_length: int) -> tuple[float, bool]:
    """The harness's loop for one (context, continuation): left-truncated input, full logits, log_softmax, gather."""
    whole = (context + continuation)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0, -len(continuation) :]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    target = torch.tensor(continuation)
    return float(log_probs[torch.arange(len(continuation)), target].sum()), bool((logits.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_spaces_and_cuts_the_whole_encoding(gpt2_tokenizer):
    encode = gpt2_tokenizer.encode
    assert encode_pair(gpt2_tokenizer, "The cat ", "sat") == (encode("The cat"), encode(" sat"))
    # "345" is one token: the harness keeps the whole encoding's tokens after the context's count, not the merge
    assert encode("345 apples") == [27712, 22514] and encode("3") == [18]
    assert encode_pair(gpt2_tokenizer, "3", "45 apples") == ([18], [22514])
    assert encode_pair(gpt2_tokenizer, "", " sat") == ([EOS], encode(" sat"))
    assert encode_pair(gpt2_tokenizer, "", "<|endoftext|> sat") == ([EOS], encode(" sat"))


def test_rolling_windows_score_every_token_once_with_the_most_context():
    tokens = list(range(10, 20))
    windows = rolling_windows(tokens, prefix=0, max_length=4)
    assert windows == [
        Request([0], [[10, 11, 12, 13]]),
        Request([13], [[14, 15, 16, 17]]),
        Request([15, 16, 17], [[18, 19]]),  # the last, short window still sees 4 tokens
    ]
    for stride in (1, 2, 3, 4):
        windows = rolling_windows(tokens, prefix=0, max_length=4, stride=stride)
        assert [t for w in windows for t in w.continuations[0]] == tokens
        for window in windows:
            inputs = (window.context + window.continuations[0])[:-1]
            assert len(inputs) <= 4 and (window.context == [0] or len(inputs) == 4)


@pytest.mark.parametrize("batch_size, head_chunk", [(1, None), (5, None), (5, 3)])
def test_packed_scores_equal_one_forward_per_choice(tiny, batch_size, head_chunk, monkeypatch):
    """Also with the LM head run 3 positions at a time (by default its chunk holds more than this test has)."""
    if head_chunk:
        monkeypatch.setattr("lmpipe.zero_shot.scoring.default_chunk_tokens", lambda vocab, device: head_chunk)
    _, model, tokenizer = tiny
    rows = choice_rows(12, seed=1)
    requests = [choice_request(tokenizer, r["context"], [" " + c for c in r["choices"]]) for r in rows]
    assert any(len(r.context) + max(map(len, r.continuations)) > 49 for r in requests)  # truncation is exercised
    assert any(len(c) == 1 for r in requests for c in r.continuations)
    # the model's own greedy continuation of a context: "greedy" must be true for it (and false for the others)
    context = requests[0].context[:10]
    greedy_ids = model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False, pad_token_id=EOS)[0, 10:]
    requests.append(Request(context, [greedy_ids.tolist(), requests[1].continuations[0]]))
    scores = score_requests(model, requests, max_length=48, batch_size=batch_size)
    assert scores[-1][0].greedy
    for request, request_scores in zip(requests, scores):
        for continuation, score in zip(request.continuations, request_scores):
            logprob, greedy = one_forward_per_choice(model, request.context, continuation, 48)
            assert score.logprob == pytest.approx(logprob, rel=1e-5)
            assert score.greedy == greedy


def test_multiple_choice_outputs_equal_hand_metrics(tiny, tmp_path, capsys):
    root, model, tokenizer = tiny
    rows = choice_rows(10, seed=2)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["evaluate", str(root / "model"), "--task", "multiple_choice", "--data", str(data), "--output_dir", str(out)]
    assert main([*argv, "--batch_size", "3"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    acc, acc_norm = [], []
    for row, sample in zip(rows, samples):
        lls = [one_forward_per_choice(model, *encode_pair(tokenizer, row["context"], " " + c), 48)[0]
               for c in row["choices"]]
        assert sample["loglikelihoods"] == pytest.approx(lls, rel=1e-5)
        acc.append(int(np.argmax(lls)) == row["label"])
        acc_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(lls, row["choices"])])) == row["label"])
    assert results["n"] == len(samples) == 10
    assert results["metrics"]["acc"] == pytest.approx(np.mean(acc))
    assert results["metrics"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert results["metrics"]["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(10))
    assert results["metrics"]["chance"] == pytest.approx(np.mean([1 / len(r["choices"]) for r in rows]))
    assert results["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert f"| multiple_choice | acc | {results['metrics']['acc']:.4f} |" in printed


def test_lambada_outputs_equal_hand_metrics(tiny, tmp_path):
    root, model, tokenizer = tiny
    rng = random.Random(3)
    rows = [{"text": sentence(rng, 2, 70)} for _ in range(8)]
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["evaluate", str(root / "model"), "--task", "lambada", "--data", str(data), "--output_dir", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    lls, greedy = [], []
    for row in rows:
        words = row["text"].split(" ")
        context, target = encode_pair(tokenizer, " ".join(words[:-1]), " " + words[-1])
        ll, is_greedy = one_forward_per_choice(model, context, target, 48)
        lls.append(ll)
        greedy.append(is_greedy)
    assert results["metrics"]["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)
    assert results["metrics"]["acc"] == pytest.approx(np.mean(greedy))


def test_adapters_build_the_harness_prompts():
    hellaswag = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow [title]",
                 "ctx_b": "covering the window of a car.", "endings": [" [header] A man  drives.", "B"], "label": "1"}
    assert hellaswag_row(hellaswag) == {
        "context": "Removing ice from car: Then, the man writes over the snow. Covering the window of a car.",
        "choices": [" A man drives.", "B"], "label": 1}  # the harness strips before removing tags
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}
    assert arc_row(arc) == {"context": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam"], "label": 1}
    piqa = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}
    assert piqa_row(piqa) == {"context": "Question: Open a jar\nAnswer:", "choices": ["twist the lid", "eat the lid"],
                              "label": 0}


def test_formats_are_found_by_their_columns():
    assert detect_format({"context": "", "choices": [], "label": 0}) == "native"
    assert detect_format({"ctx_a": "", "ctx_b": "", "endings": [], "label": "0"}) == "hellaswag"
    assert detect_format({"ctx": "", "endings": [], "label": "0"}) == "hellaswag"
    assert detect_format({"question": "", "choices": {}, "answerKey": "A"}) == "arc"
    assert detect_format({"goal": "", "sol1": "", "sol2": "", "label": 0}) == "piqa"


BAD_ROWS = {
    "label out of range": ({"context": "a", "choices": ["b", "c"], "label": 2},
                           "row 2: 'label' must be an integer index into the 2 choices, got 2 (native format)"),
    "one choice": ({"context": "a", "choices": ["b"], "label": 0},
                   "row 2: 'choices' must be a list of at least 2 non-empty texts (native format)"),
    # Arrow would read the column as floats and name row 1 for its 0.0: the row as written is the bad one
    "label 1.0": ({"context": "a", "choices": ["b", "c"], "label": 1.0},
                  "row 2: 'label' must be an integer index into the 2 choices, got 1.0 (native format)"),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_a_bad_row_is_a_one_line_error_and_writes_nothing(tiny, tmp_path, capsys, name):
    root, _, _ = tiny
    row, message = BAD_ROWS[name]
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "out"
    argv = ["evaluate", str(root / "model"), "--task", "multiple_choice", "--data", str(data), "--output_dir", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {data} {message}"
    assert not out.exists()


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_results(tiny, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each rank scores every other batch; rank 0 writes the same
    samples, in the same order, as one process (7 rows in batches of 2: the ranks get unequal shares)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    root, _, _ = tiny
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in choice_rows(7, seed=4)))
    flags = ["--task", "multiple_choice", "--data", str(data), "--batch_size", "2"]
    assert main(["evaluate", str(root / "model"), *flags, "--output_dir", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0",
              "--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml"),
              str(REPO / "pipelines/evaluate_zero_shot.py"), str(root / "model"), *flags,
              "--output_dir", str(tmp_path / "two")]
    done = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| multiple_choice | acc |") == 1  # only rank 0 prints
    one, two = ([json.loads(line) for line in (tmp_path / d / "samples.jsonl").open()] for d in ("one", "two"))
    assert [s["index"] for s in two] == list(range(7))
    for a, b in zip(one, two):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], rel=1e-6)
        assert (a["prediction"], a["prediction_norm"]) == (b["prediction"], b["prediction_norm"])
    metrics = [json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("one", "two")]
    assert metrics[0] == metrics[1]
