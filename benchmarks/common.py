"""Shared by the benchmark scripts: machine facts, load average, median/min-max, the table and the JSON line.

Benchmarks print a short table and one JSON line (last line of stdout); nothing here is asserted by a test.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def load_average() -> float:
    """The 1-minute load average: above the core count, other processes share the CPUs and figures are noisy."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matrix-unit flags that decide bf16 speed on x86 (AVX512-BF16, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if f" {flag}" in text]


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summary(values: Sequence[float]) -> dict:
    """Median and range of repeated measurements (the median resists a noisy neighbour better than the mean)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(stat: dict, digits: int = 2, scale: float = 1.0) -> str:
    """`median (min-max)` of a summary()."""
    if stat["median"] is None:
        return "n/a"
    f = lambda v: f"{v * scale:,.{digits}f}"  # noqa: E731
    return f"{f(stat['median'])} ({f(stat['min'])}-{f(stat['max'])})"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], file=sys.stdout) -> None:
    """A plain fixed-width table."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)), file=file)


def emit_json(payload: dict) -> None:
    """The one JSON line a benchmark prints last."""
    print(json.dumps(payload, sort_keys=False), flush=True)
