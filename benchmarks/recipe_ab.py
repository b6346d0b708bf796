"""A/B of whole runs: one recipe under several sets of flags, end to end, interleaved, several repetitions.

Each run is `python -m lmpipe pretrain RECIPE FLAGS --output_dir TMP` in a child process (what a user runs),
and its metrics.json gives train runtime, train tokens/s, exact eval loss and bits per byte; the child's wall time
includes data preparation and evaluation. Ratios are paired per repetition.

    HF_HUB_OFFLINE=1 python benchmarks/recipe_ab.py recipes/pretrain/default.yaml \
        --variant fp32: --variant bf16:--bf16,true,--use_cpu,true --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402


def run_recipe(recipe: str, flags: list[str], output_dir: Path | None = None) -> dict:
    """One end-to-end run in a fresh process (and a fresh output directory unless given): metrics.json + wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = output_dir or Path(tmp) / "run"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(Path(tmp) / "cache")}
        command = [sys.executable, "-m", "lmpipe", "pretrain", recipe, *flags, "--output_dir", str(run_dir),
                   "--report_to", "none", "--disable_tqdm", "true"]
        start = time.perf_counter()
        out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "wall_s": wall}


def comma_words(text: str) -> list[str]:
    """A comma-separated option as its words, empty ones dropped: flags (`--flag,value`), rates or seeds."""
    return [word for word in text.split(",") if word]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """NAME:--flag,value,--flag,value (commas separate the argv words)."""
    name, _, flags = text.partition(":")
    return name, comma_words(flags)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--variant", action="append", required=True, help="NAME:--flag,value,...")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--common", default="", help="flags for every variant, comma-separated")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    common = comma_words(args.common)
    load = load_average()
    runs = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, flags in variants:
            runs[name].append(run_recipe(args.recipe, common + flags))
            r = runs[name][-1]
            print(f"# {name}: wall {r['wall_s']:.1f} s, train {r['train_runtime_s']:.1f} s, "
                  f"eval loss {r['eval_loss']:.4f}", file=sys.stderr, flush=True)
    first = variants[0][0]
    results, rows = {}, []
    for name, flags in variants:
        measured = runs[name]
        entry = {
            "flags": flags,
            "wall_s": summary([r["wall_s"] for r in measured]),
            "train_runtime_s": summary([r["train_runtime_s"] for r in measured]),
            "train_tokens_per_s": summary([r["train_tokens_per_second"] for r in measured]),
            "eval_loss": summary([r["eval_loss"] for r in measured]),
            "bits_per_byte": summary([r["bits_per_byte"] for r in measured]),
            "train_tokens": measured[0]["train_tokens"],
        }
        if name != first:
            pairs = list(zip(runs[first], measured))
            entry[f"train_tokens_per_s_over_{first}"] = summary(
                [b["train_tokens_per_second"] / a["train_tokens_per_second"] for a, b in pairs]
            )
            entry[f"wall_over_{first}"] = summary([b["wall_s"] / a["wall_s"] for a, b in pairs])
        results[name] = entry
        rows.append([name, fmt(entry["wall_s"], 1), fmt(entry["train_runtime_s"], 1),
                     fmt(entry["train_tokens_per_s"], 0),
                     fmt(entry.get(f"train_tokens_per_s_over_{first}", {"median": None}), 2),
                     fmt(entry["eval_loss"], 4), fmt(entry["bits_per_byte"], 3)])
    print_table(["variant", "wall s", "train s", "train tok/s", f"tok/s / {first}", "eval loss", "bits/byte"], rows)
    emit_json({"benchmark": "recipe_ab", "recipe": args.recipe, "common_flags": common, "repeats": args.repeats,
               "machine": machine(), "load_average": {"start": load, "end": load_average()}, "results": results})


if __name__ == "__main__":
    main()
