"""The three tasks: rows -> requests, and scores -> per-example samples and metrics, as the harness defines them.

multiple_choice: `acc` is the argmax of the summed log-likelihoods, `acc_norm` of those divided by each choice's
length in characters (the harness's `acc_norm`). lambada: `acc` is 1 when greedy decoding gives the last word's
tokens, `perplexity` is exp of minus the mean (per example) log-likelihood of the last word (lambada_openai).
perplexity: rolling windows per document; token, word and byte perplexity and bits per byte (the wikitext task's
word and byte counts: `re.split(r"\\s+", text)` and UTF-8 bytes of the text itself).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lmpipe.zero_shot.requests import Request, choice_request, encode, encode_pair, prefix_token_id, rolling_windows
from lmpipe.zero_shot.scoring import Score

TASKS = ("multiple_choice", "lambada", "perplexity")


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample standard deviation (n - 1), as the harness's `mean_stderr`."""
    array = np.asarray(values, dtype=np.float64)
    stderr = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return float(array.mean()), stderr


@dataclass
class Task:
    """A task's requests (several per example for rolling windows) and how to read its scores back."""

    requests: list[Request]
    owners: list[int]  # example index of each request


def multiple_choice_task(rows: list[dict], tokenizer: PreTrainedTokenizerBase, delimiter: str) -> Task:
    requests = [choice_request(tokenizer, row["context"], [delimiter + c for c in row["choices"]]) for row in rows]
    return Task(requests, list(range(len(rows))))


def lambada_split(text: str) -> tuple[str, str]:
    """lambada_openai's context (every space-separated word but the last) and target (' ' + the last word)."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def lambada_task(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> Task:
    requests = []
    for row in rows:
        context, target = encode_pair(tokenizer, *lambada_split(row["text"]))
        requests.append(Request(context, [target]))
    return Task(requests, list(range(len(rows))))


def perplexity_task(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, stride: int | None) -> Task:
    requests, owners = [], []
    prefix = prefix_token_id(tokenizer)
    for index, row in enumerate(rows):
        windows = rolling_windows(encode(tokenizer, row["text"]), prefix, max_length, stride)
        requests += windows
        owners += [index] * len(windows)
    return Task(requests, owners)


def multiple_choice_results(rows: list[dict], scores: list[list[Score]]) -> tuple[dict[str, Any], list[dict]]:
    samples, acc, acc_norm = [], [], []
    for index, (row, row_scores) in enumerate(zip(rows, scores)):
        loglikelihoods = np.array([s.logprob for s in row_scores])
        lengths = np.array([float(len(c)) for c in row["choices"]])
        prediction, prediction_norm = int(np.argmax(loglikelihoods)), int(np.argmax(loglikelihoods / lengths))
        acc.append(float(prediction == row["label"]))
        acc_norm.append(float(prediction_norm == row["label"]))
        samples.append({
            "index": index, "context": row["context"], "choices": row["choices"], "label": row["label"],
            "loglikelihoods": loglikelihoods.tolist(), "prediction": prediction, "prediction_norm": prediction_norm,
            "acc": acc[-1], "acc_norm": acc_norm[-1],
        })
    (acc_mean, acc_stderr), (norm_mean, norm_stderr) = mean_and_stderr(acc), mean_and_stderr(acc_norm)
    chance = float(np.mean([1 / len(row["choices"]) for row in rows]))
    metrics = {"acc": acc_mean, "acc_stderr": acc_stderr, "acc_norm": norm_mean, "acc_norm_stderr": norm_stderr,
               "chance": chance}
    return metrics, samples


def lambada_results(rows: list[dict], scores: list[list[Score]]) -> tuple[dict[str, Any], list[dict]]:
    samples, acc, loglikelihoods = [], [], []
    for index, (row, (score,)) in enumerate(zip(rows, scores)):
        context, target = lambada_split(row["text"])
        acc.append(float(score.greedy))
        loglikelihoods.append(score.logprob)
        samples.append({"index": index, "context": context, "target": target, "loglikelihood": score.logprob,
                        "greedy": score.greedy, "acc": acc[-1]})
    acc_mean, acc_stderr = mean_and_stderr(acc)
    metrics = {"acc": acc_mean, "acc_stderr": acc_stderr, "perplexity": math.exp(-float(np.mean(loglikelihoods)))}
    return metrics, samples


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def perplexity_results(rows: list[dict], task: Task, scores: list[list[Score]]) -> tuple[dict[str, Any], list[dict]]:
    loglikelihoods = [0.0] * len(rows)
    tokens = [0] * len(rows)
    for owner, request, (score,) in zip(task.owners, task.requests, scores):
        loglikelihoods[owner] += score.logprob
        tokens[owner] += len(request.continuations[0])
    samples = []
    for index, row in enumerate(rows):
        samples.append({"index": index, "loglikelihood": loglikelihoods[index], "tokens": tokens[index],
                        "words": count_words(row["text"]), "bytes": len(row["text"].encode("utf-8"))})
    total = sum(loglikelihoods)
    n_tokens, n_words, n_bytes = (sum(s[k] for s in samples) for k in ("tokens", "words", "bytes"))
    metrics = {
        "token_perplexity": math.exp(-total / n_tokens) if n_tokens else float("nan"),
        "word_perplexity": math.exp(-total / n_words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
        "nll_per_token": -total / n_tokens if n_tokens else float("nan"),
        "tokens": n_tokens, "words": n_words, "bytes": n_bytes,
    }
    return metrics, samples
