"""results.json, samples.jsonl and the printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmpipe.run.files import write_text_atomically

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


def write_outputs(output_dir: str, results: dict[str, Any], samples: list[dict]) -> None:
    """Samples first, results last: a results.json present means the samples beside it are complete."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(directory / SAMPLES_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    write_text_atomically(directory / RESULTS_FILE, json.dumps(results, indent=2) + "\n")


def metric_cell(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def format_table(results: dict[str, Any]) -> str:
    """| task | metric | value | ± stderr | chance | in the harness's layout, accuracies with their chance level."""
    metrics = results["metrics"]
    lines = [f"{results['model']} on {results['data']} ({results['n']:,} examples)",
             "| task | metric | value | stderr | chance |", "|---|---|---|---|---|"]
    for name, value in metrics.items():
        if name.endswith("_stderr") or name == "chance":
            continue
        stderr = metrics.get(f"{name}_stderr")
        chance = metrics.get("chance") if name.startswith("acc") and "chance" in metrics else None
        if results["task"] == "lambada" and name == "acc":
            chance = None
        cells = [results["task"], name, metric_cell(value), "" if stderr is None else f"± {metric_cell(stderr)}",
                 "" if chance is None else metric_cell(chance)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
