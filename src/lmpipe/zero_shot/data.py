"""Rows for a task: a local file or a Hub dataset, published benchmark columns adapted, every row checked first.

Native rows: multiple_choice `{"context": str, "choices": [str, ...], "label": int}`; lambada and perplexity
`{"text": str}`. Adapters rebuild HellaSwag's, ARC's and PIQA's rows the way the harness's task files do.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from datasets import Dataset, load_dataset

from lmpipe.data.sources import load_local_file
from lmpipe.errors import LmpipeError

FORMATS = ("auto", "native", "hellaswag", "arc", "piqa")


def load_rows(data: str, split: str | None, config: str | None, sample_by: str) -> tuple[list[dict], str]:
    """The rows as dicts and a sha256: of the file for a local file, of the rows' JSON for a Hub dataset."""
    if Path(data).exists() or Path(data).suffix:
        dataset = load_local_file(data, sample_by)  # checks the file, names a bad line
        digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
        if Path(data).suffix.lower() == ".jsonl":  # as written: Arrow would make every label 1.0 if one row has 1.0
            with Path(data).open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()], digest
        return dataset.to_list(), digest
    if not split:
        raise LmpipeError(f"{data}: no such file; for a Hub dataset give --split (e.g. validation)")
    try:
        dataset = load_dataset(data, config, split=split)
    except Exception as e:  # noqa: BLE001 - the Hub's own reason, in one line
        raise LmpipeError(f"{data}: cannot load split '{split}' ({str(e).strip().splitlines()[0]})") from None
    assert isinstance(dataset, Dataset)
    rows = dataset.to_list()
    digest = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True, default=str) for r in rows).encode()).hexdigest()
    return rows, digest


def detect_format(row: dict) -> str:
    if {"context", "choices", "label"} <= row.keys():
        return "native"
    if "endings" in row and ("ctx" in row or {"ctx_a", "ctx_b"} <= row.keys()):
        return "hellaswag"
    if {"question", "choices", "answerKey"} <= row.keys():
        return "arc"
    if {"goal", "sol1", "sol2", "label"} <= row.keys():
        return "piqa"
    return "native"


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning of HellaSwag text: WikiHow's ` [title]` becomes '. ', other [tags] go, double spaces
    become single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_row(row: dict) -> dict:
    """hellaswag.yaml: `activity_label: ctx_a Ctx_b` (ctx_b capitalised) and the endings, all preprocessed; a row
    with only `ctx` uses it as is."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize() if "ctx_a" in row else row["ctx"]
    if row.get("activity_label"):
        context = row["activity_label"] + ": " + context
    return {"context": hellaswag_preprocess(context), "choices": [hellaswag_preprocess(e) for e in row["endings"]],
            "label": int(row["label"])}


def arc_row(row: dict) -> dict:
    """arc_easy.yaml / arc_challenge.yaml: `Question: {question}\\nAnswer:`, the choices' texts, answerKey's index."""
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
    return {"context": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "label": labels.index(row["answerKey"])}


def piqa_row(row: dict) -> dict:
    """piqa.yaml: `Question: {goal}\\nAnswer:` with sol1 and sol2."""
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "label": int(row["label"])}


ADAPTERS = {"hellaswag": hellaswag_row, "arc": arc_row, "piqa": piqa_row}


def check_choice_row(row: dict) -> None:
    missing = [key for key in ("context", "choices", "label") if key not in row]
    if missing:
        raise ValueError(f"no {', '.join(map(repr, missing))}; columns are {', '.join(row)}")
    context, choices, label = row["context"], row["choices"], row["label"]
    if not isinstance(context, str):
        raise ValueError("'context' must be text")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("'choices' must be a list of at least 2 non-empty texts")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"'label' must be an integer index into the {len(choices)} choices, got {label!r}")


def check_text_row(row: dict, column: str) -> None:
    if column not in row:
        raise ValueError(f"no column '{column}'; columns are {', '.join(row)}")
    if row[column] is None:
        raise ValueError(f"column '{column}' is null")
    if not isinstance(row[column], str):
        raise ValueError(f"column '{column}' holds {type(row[column]).__name__}, not text")


def task_rows(rows: list[dict], task: str, data_format: str, text_column: str, source: str) -> list[dict]:
    """Native rows for the task; the first bad row stops the run, named by its number (from 1)."""
    if not rows:
        raise LmpipeError(f"{source}: no rows")
    if task != "multiple_choice":  # perplexity skips empty documents (nothing to score); a last word needs a text
        out = []
        for number, row in enumerate(rows, start=1):
            try:
                check_text_row(row, text_column)
                if task == "lambada" and not row[text_column].strip():
                    raise ValueError(f"column '{text_column}' is empty")
            except ValueError as e:
                raise LmpipeError(f"{source} row {number}: {e}") from None
            if row[text_column]:
                out.append({"text": row[text_column]})
        if not out:
            raise LmpipeError(f"{source}: every text is empty")
        return out
    data_format = detect_format(rows[0]) if data_format == "auto" else data_format
    adapt = ADAPTERS.get(data_format, dict)
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            adapted = adapt(row)
            check_choice_row(adapted)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            problem = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise LmpipeError(f"{source} row {number}: {problem} ({data_format} format)") from None
        out.append(adapted)
    return out
