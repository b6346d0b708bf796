"""Build `shakespeare_dialogues.jsonl` from `tinyshakespeare.txt` (run from the repository root).

Real multi-turn dialogue: the plays' consecutive speeches, taken four at a time without overlap, become a
conversation of two exchanges (speech 1 and 3 as user turns, 2 and 4 as the assistant's replies) after one fixed
system message; each content is "Speaker: lines". Windows holding a speech longer than 120 characters are skipped,
and the first 600 conversations are kept. `tests/test_chat_data.py` checks that the shipped file is exactly what
this script writes.
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent
SOURCE = DATA / "tinyshakespeare.txt"
TARGET = DATA / "shakespeare_dialogues.jsonl"
SYSTEM = "Reply as the next speaker in a Shakespeare play."
SPEECHES, MAX_CHARS, CONVERSATIONS = 4, 120, 600


def speeches(text: str) -> list[str]:
    """Each blank-line separated block "Name:\\nlines" as "Name: lines"."""
    out = []
    for block in text.split("\n\n"):
        name, _, lines = block.strip().partition("\n")
        if name.endswith(":") and lines:
            out.append(f"{name} {lines}")
    return out


def conversations(all_speeches: list[str]) -> list[dict]:
    out = []
    for start in range(0, len(all_speeches) - SPEECHES + 1, SPEECHES):
        window = all_speeches[start : start + SPEECHES]
        if any(len(speech) > MAX_CHARS for speech in window):
            continue
        roles = ["user", "assistant"] * (SPEECHES // 2)
        messages = [{"role": "system", "content": SYSTEM}]
        messages += [{"role": role, "content": speech} for role, speech in zip(roles, window)]
        out.append({"messages": messages})
    return out[:CONVERSATIONS]


def render() -> str:
    rows = conversations(speeches(SOURCE.read_text(encoding="utf-8")))
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


if __name__ == "__main__":
    TARGET.write_text(render(), encoding="utf-8")
