"""Build `nq_open_conversations.jsonl` from `nq_open_efficientqa_dev.jsonl` (run from the repository root).

lmpipe ships no real multi-turn chat data, so conversations are made from real NQ-open rows: consecutive questions
are the successive user turns of one conversation (3, then 2, then 3, ... questions), each followed by an assistant
turn holding the row's first accepted answer, after one fixed system message. `tests/test_chat_data.py` checks
that the shipped file is exactly what this script writes.
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent
SOURCE = DATA / "nq_open_efficientqa_dev.jsonl"
TARGET = DATA / "nq_open_conversations.jsonl"
SYSTEM = "Answer each question with a short fact: a name, a date, a number or a place."
GROUP_SIZES = (3, 2)


def conversations(rows: list[dict]) -> list[dict]:
    out, start, turn = [], 0, 0
    while start < len(rows):
        group = rows[start : start + GROUP_SIZES[turn % len(GROUP_SIZES)]]
        messages = [{"role": "system", "content": SYSTEM}]
        for row in group:
            messages += [
                {"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"][0]}
            ]
        out.append({"messages": messages})
        start, turn = start + len(group), turn + 1
    return out


def render() -> str:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "".join(json.dumps(conversation, ensure_ascii=False) + "\n" for conversation in conversations(rows))


if __name__ == "__main__":
    TARGET.write_text(render(), encoding="utf-8")
