"""Build the NQ-open preference pairs (run from the repository root; rerunning gives the same bytes).

Writes `nq_open_preferences.jsonl` (DPO training) and `nq_open_preferences_heldout.jsonl` (evaluation), rows
`{"prompt", "chosen", "rejected"}` from `nq_open_efficientqa_dev.jsonl`:

- `prompt` is the question as `lmpipe finetune-qa` renders it (`recipes/finetune/nq_open.yaml`: the default QA
  template), so DPO starts from exactly what the SFT model was trained on;
- `chosen` is the first accepted answer (the SFT target), `rejected` another question's first answer of the same
  kind (a year for a year, a date for a date, a number for a number, a name for a name to a "who" question, ...),
  drawn with a fixed seed from the same file's rows and never equal to any accepted answer of the question after
  SQuAD normalisation (case, punctuation, articles): what the QA exact match would also count as wrong;
- both answers start with the QA answer prefix (a space), so `prompt + chosen` is the SFT training text and the
  prompt and the answer tokenise apart exactly as in fine-tuning.

Splits: the SFT recipe holds out its last 10 % of rows for validation (`split_validation`); those rows are in
neither file, so the SFT validation stays unseen by DPO. The held-out file is HELD_OUT rows drawn with the seed
from the SFT training rows: questions the SFT model learned and DPO never sees, so the evaluation asks whether DPO
keeps what SFT learned. Each file draws its rejected answers from its own rows only.
`tests/test_preference_data.py` checks that the shipped files are exactly what this script writes.
"""

import json
import random
import re
import string
from pathlib import Path

DATA = Path(__file__).resolve().parent
SOURCE = DATA / "nq_open_efficientqa_dev.jsonl"
TRAIN = DATA / "nq_open_preferences.jsonl"
HELD_OUT_FILE = DATA / "nq_open_preferences_heldout.jsonl"
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"  # lmpipe.data.qa.DEFAULT_TEMPLATE, the nq_open recipe's
ANSWER_PREFIX = " "  # QAArguments.answer_prefix's default
SFT_VALIDATION_PERCENTAGE = 10  # recipes/finetune/nq_open.yaml's validation_split_percentage
HELD_OUT = 200
SEED = 1234

MONTHS = {"january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"}
NUMBER_WORDS = {
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty",
    "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million", "billion",
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
}
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)
NAME_JOINERS = {"of", "the", "and", "&", "de", "da", "di", "du", "del", "der", "van", "von", "la", "le", "y", "in"}


def normalise(text: str) -> str:
    """SQuAD's answer normalisation (what lmpipe's exact match compares): lower case, no punctuation or articles."""
    text = "".join(char for char in text.lower() if char not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def kind(question: str, answer: str) -> str:
    """The answer's kind, from its shape and, for names, the question word: rejected answers keep the kind."""
    words = answer.split()
    lowered = [w.strip(string.punctuation).lower() for w in words]
    if re.fullmatch(r"1\d{3}|20\d{2}", answer):
        return "year"
    if any(w in MONTHS for w in lowered) and re.search(r"\d", answer):
        return "date"
    if re.search(r"\d", answer) or any(w in NUMBER_WORDS for w in lowered):
        return "number"
    if words[0][:1].isupper() and all(w[:1].isupper() or w.lower() in NAME_JOINERS for w in words):
        first = question.split()[0].lower()
        if first.startswith("who"):
            return "person"
        return "place" if first.startswith("where") else "name"
    return "phrase"


def pairs(rows: list[dict], rng: random.Random) -> list[dict]:
    """One pair per row; rejected answers come from these rows only (first accepted answers, one per spelling)."""
    pool, seen = {}, set()  # kind -> [(answer, its normalised form)]
    for row in rows:
        answer = row["answer"][0]
        if normalise(answer) not in seen:
            seen.add(normalise(answer))
            pool.setdefault(kind(row["question"], answer), []).append((answer, normalise(answer)))
    everything = [entry for entries in pool.values() for entry in entries]
    out = []
    for row in rows:
        gold = {normalise(answer) for answer in row["answer"]}
        same_kind = [a for a, norm in pool[kind(row["question"], row["answer"][0])] if norm not in gold]
        wrong = same_kind or [a for a, norm in everything if norm not in gold]
        out.append({
            "prompt": PROMPT_TEMPLATE.format(question=row["question"]),
            "chosen": ANSWER_PREFIX + row["answer"][0],
            "rejected": ANSWER_PREFIX + rng.choice(wrong),
        })
    return out


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(DPO training rows, held-out rows): both from the SFT recipe's training rows, in file order."""
    sft_train = len(rows) - max(1, int(len(rows) * SFT_VALIDATION_PERCENTAGE / 100))  # as split_validation cuts
    held = set(random.Random(SEED).sample(range(sft_train), HELD_OUT))
    return [rows[i] for i in range(sft_train) if i not in held], [rows[i] for i in sorted(held)]


def render() -> tuple[str, str]:
    """The two files' text: (training, held-out)."""
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held_out = split(rows)
    rng = random.Random(SEED)
    return tuple(
        "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs(part, rng)) for part in (train, held_out)
    )


if __name__ == "__main__":
    train_text, held_out_text = render()
    TRAIN.write_text(train_text, encoding="utf-8")
    HELD_OUT_FILE.write_text(held_out_text, encoding="utf-8")
