"""QA exact match / token F1 (the local `evaluate` module) against scores computed by hand."""

import tomllib
from pathlib import Path

import pytest

import lmpipe
from lmpipe.errors import LmpipeError
from lmpipe.training.qa_scores import QA_METRIC_PATH, score_predictions

REPO = Path(__file__).resolve().parents[1]

# (prediction, accepted answers, exact match, token F1), each worked out by hand after SQuAD normalisation.
CASES = [
    # identical after lower-casing
    ("Paris", ["paris"], 1.0, 1.0),
    # matches only the second accepted answer: the best answer counts (F1 against the first is 0)
    ("George Washington", ["Abraham Lincoln", "george washington"], 1.0, 1.0),
    # punctuation and the article 'The' are dropped: "beatles" == "beatles"
    ("The Beatles!", ["Beatles"], 1.0, 1.0),
    # "an apple, a day." -> "apple day"
    ("an apple, a day.", ["apple day"], 1.0, 1.0),
    # "big red dog barked" vs "red dog": 2 common, P = 2/4, R = 2/2 -> F1 = 2 * .5 * 1 / 1.5 = 2/3
    ("the big red dog barked", ["a red dog"], 0.0, 2 / 3),
    # best of two partial overlaps: vs "red dog" 2/3 (above); vs "big red dog barked loudly" 4 common,
    # P = 4/4, R = 4/5 -> F1 = 2 * 1 * .8 / 1.8 = 8/9
    ("the big red dog barked", ["red dog", "big red dog barked loudly"], 0.0, 8 / 9),
    # token counts, not sets: "new new york" vs "new york": common = min(2, 1) + 1 = 2, P = 2/3, R = 1 -> 4/5
    ("new new york", ["New York"], 0.0, 4 / 5),
    # no common token
    ("London", ["Paris", "Rome"], 0.0, 0.0),
    # an empty prediction scores nothing against a non-empty answer
    ("", ["Paris"], 0.0, 0.0),
]


def test_exact_match_and_f1_match_hand_computed_scores():
    predictions = [case[0] for case in CASES]
    references = [case[1] for case in CASES]
    scores = score_predictions(predictions, references)
    assert scores["per_example_exact_match"] == [case[2] for case in CASES]
    assert scores["per_example_f1"] == pytest.approx([case[3] for case in CASES], abs=1e-12)
    # aggregates: 4 exact matches of 9 -> 44.44; F1 = (4 + 2/3 + 8/9 + 4/5) / 9 * 100
    assert scores["exact_match"] == pytest.approx(400 / 9, abs=1e-9)
    assert scores["f1"] == pytest.approx((4 + 2 / 3 + 8 / 9 + 4 / 5) / 9 * 100, abs=1e-9)


def test_answers_that_normalise_to_nothing_match_each_other():
    """SQuAD v2's rule: F1 is 1 when both sides are empty after normalisation, so an exact match has F1 1."""
    scores = score_predictions(["The.", "a"], [["an"], ["Paris"]])
    assert scores["per_example_exact_match"] == [1.0, 0.0]
    assert scores["per_example_f1"] == [1.0, 0.0]


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        (["a", "b"], [["a"]], "2 predictions for 1 questions"),
        (["a"], [[]], "references 0: expected a non-empty list of answer strings"),
        (["a"], ["a"], "references 0: expected a non-empty list"),
        (["a", None], [["a"], ["b"]], "prediction 1: expected a string, got NoneType"),
        ([], [], "no predictions to score"),
    ],
)
def test_bad_inputs_are_named(predictions, references, message):
    with pytest.raises(LmpipeError, match=message):
        score_predictions(predictions, references)


def test_metric_script_ships_as_package_data():
    """A wheel includes the metric only if pyproject's package-data globs match it (it is not a Python package);
    CI's second step runs this on a non-editable install, where the installed copy must exist."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmpipe"]
    source = REPO / "src" / "lmpipe"
    shipped = {path.relative_to(source) for pattern in patterns for path in source.glob(pattern)}
    script = QA_METRIC_PATH / "qa_exact_match_f1.py"
    assert script.relative_to(Path(lmpipe.__file__).parent) in shipped and script.is_file()
