"""Exact match and token F1 of generated answers against every accepted answer (SQuAD-style normalisation).

A local `evaluate` module (the Hub's `squad` script is unreachable offline, and it takes SQuAD-shaped dicts):
`evaluate.load(<this directory>)`. Normalisation is SQuAD v1.1's: lower-case, drop punctuation, drop the articles
a/an/the, collapse whitespace. Each question scores the best of its accepted answers. Token F1 when either side
normalises to nothing is 1 if both do and 0 otherwise (SQuAD v2's rule), so an exact match always has F1 1.
"""

import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers, one string per question.
    references: list of lists of accepted answers, one non-empty list per question.
Returns:
    exact_match: percentage (0-100) of questions whose normalised prediction equals an accepted answer.
    f1: mean over questions of the best token F1 against any accepted answer, as a percentage (0-100).
    per_example_exact_match: 0.0 or 1.0 per question.
    per_example_f1: best token F1 per question, in [0, 1].
Examples:
    >>> metric = evaluate.load("src/lmpipe/training/metric_modules/qa_exact_match_f1")
    >>> metric.compute(predictions=["The Eiffel Tower."], references=[["Louvre", "eiffel tower"]])["exact_match"]
    100.0
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower-case, remove punctuation, remove articles, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised texts (token counts, as in SQuAD)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class QaExactMatchF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        pairs = list(zip(predictions, references))
        exact = [float(any(normalize_answer(p) == normalize_answer(r) for r in refs)) for p, refs in pairs]
        f1 = [max(token_f1(p, r) for r in refs) for p, refs in pairs]
        return {
            "exact_match": 100.0 * sum(exact) / len(pairs),
            "f1": 100.0 * sum(f1) / len(pairs),
            "per_example_exact_match": exact,
            "per_example_f1": f1,
        }
