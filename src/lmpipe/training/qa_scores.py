"""QA exact match and token F1 through the local `evaluate` module in `metric_modules/qa_exact_match_f1`.

`evaluate.load` of a local directory needs no network (it works with HF_HUB_OFFLINE=1): it copies the script into
the modules cache (HF_MODULES_CACHE, one folder per hash of the script's content) and imports it from there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate

from lmpipe.errors import LmpipeError

QA_METRIC_PATH = Path(__file__).resolve().parent / "metric_modules" / "qa_exact_match_f1"


@functools.cache
def qa_metric() -> evaluate.EvaluationModule:
    """The metric, loaded once per process; `keep_in_memory` keeps predictions out of Arrow cache files."""
    return evaluate.load(str(QA_METRIC_PATH), keep_in_memory=True)


def check_qa_inputs(predictions: list[str], references: list[list[str]]) -> None:
    """One prediction string per question and at least one accepted answer string each."""
    if len(predictions) != len(references):
        raise LmpipeError(f"{len(predictions)} predictions for {len(references)} questions")
    for row, (prediction, answers) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise LmpipeError(f"prediction {row}: expected a string, got {type(prediction).__name__}")
        if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
            raise LmpipeError(f"references {row}: expected a non-empty list of answer strings, got {answers!r}")


def score_predictions(predictions: list[str], references: list[list[str]]) -> dict:
    """EM and F1 in 0-100 (best accepted answer per question) and the per-question scores in [0, 1]."""
    check_qa_inputs(predictions, references)
    if not predictions:
        raise LmpipeError("no predictions to score")
    return qa_metric().compute(predictions=list(predictions), references=[list(a) for a in references])
