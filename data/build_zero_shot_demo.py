"""Build the zero-shot demonstration sets in data/zero_shot/ from real text that ships here (deterministic, seeded).

    python data/build_zero_shot_demo.py

From the speeches of data/tinyshakespeare.txt (speaker lines dropped) that the Shakespeare recipes hold out for
validation (`recipes/pretrain/shakespeare*.yaml`: paragraphs, the last 10 %), so a model trained by them is scored
on text it never saw; the default model (Python's documentation) never saw any of it:
- shakespeare_next_sentence (multiple_choice): a passage of 1-2 sentences of a speech and 4 choices, its true next
  sentence and 3 sentences drawn at random from the whole text (chance: 25 %).
- shakespeare_last_word (lambada): a passage of 40-70 words ending a sentence, whose last word also occurs earlier
  in it (LAMBADA's property: the context helps), cut at that word with its punctuation removed.
(Python's documentation topics are the default model's training text; the 7 topics its recipe holds out give
about 20 items per set, too few to be worth a score, so they are not used.)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent
OUT = DATA / "zero_shot"
SEED = 1234
ROWS = 250
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def shakespeare_paragraphs() -> list[str]:
    """Each held-out speech as one line of text, without its `NAME:` line (lmpipe's own loader and split)."""
    sys.path.insert(0, str(DATA.parent / "src"))
    from lmpipe.data.sources import load_corpus, split_validation

    path = str(DATA / "tinyshakespeare.txt")
    speeches = split_validation(load_corpus(None, train_file=path, sample_by="paragraph"), 10, path)["validation"]
    return [" ".join(speech.splitlines()[1:]) for speech in speeches["text"] if len(speech.splitlines()) > 1]


def sentences_of(paragraph: str) -> list[str]:
    return [" ".join(s.split()) for s in SENTENCE_END.split(paragraph) if s.strip()]


def usable(sentence: str) -> bool:
    return 4 <= len(sentence.split()) <= 30


def next_sentence_rows(paragraphs: list[str], rng: random.Random) -> list[dict]:
    pool = sorted({s for p in paragraphs for s in sentences_of(p) if usable(s)})
    candidates = []
    for paragraph in paragraphs:
        sentences = sentences_of(paragraph)
        for i in range(1, len(sentences)):
            if usable(sentences[i]) and all(usable(s) for s in sentences[max(0, i - 2) : i]):
                candidates.append((" ".join(sentences[max(0, i - 2) : i]), sentences[i]))
    rows = []
    for context, truth in rng.sample(candidates, min(ROWS, len(candidates))):
        distractors = rng.sample([s for s in pool if s != truth and s not in context], 3)
        choices = [truth, *distractors]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return rows


def last_word_rows(paragraphs: list[str], rng: random.Random) -> list[dict]:
    """Passages that end on a word of 3+ letters seen earlier in the passage; trailing punctuation removed."""
    candidates = []
    words = [w for p in paragraphs for s in sentences_of(p) for w in s.split(" ")]
    for end in range(40, len(words)):
        last = words[end - 1].rstrip(".,;:!?\"')")
        if not (last.isalpha() and len(last) >= 3 and words[end - 1][-1:] in ".!?"):
            continue  # only at sentence ends, so the target is the end of a thought, as in LAMBADA
        length = rng.randint(40, 70)
        passage = words[max(0, end - length) : end - 1]
        if last in (w.strip(".,;:!?\"'()") for w in passage):
            candidates.append(" ".join([*passage, last]))
    return [{"text": text} for text in rng.sample(candidates, min(ROWS, len(candidates)))]


def write(name: str, rows: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{name}: {len(rows)} rows, {(OUT / name).stat().st_size:,} bytes")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    paragraphs = shakespeare_paragraphs()
    write("shakespeare_next_sentence.jsonl", next_sentence_rows(paragraphs, random.Random(SEED)))
    write("shakespeare_last_word.jsonl", last_word_rows(paragraphs, random.Random(SEED)))


if __name__ == "__main__":
    main()
