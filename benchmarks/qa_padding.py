"""QA padding waste: share of real tokens in the batches and answer tokens/s, padded (random or length-grouped) vs padding-free.

`recipes/finetune/nq_open.yaml` on NQ-open's EfficientQA dev set through lmpipe's QA path (`prepare_qa_data`,
`build_model`, `build_trainer` with `qa_collator`), three batchings side by side, interleaved: `padded` (random
batches), `padded+group_by_length` (the Trainer's LengthGroupedSampler) and `packed` (padding-free rows). The model
is the default pretraining recipe's architecture (4 layers, 128 dim) with a byte-level BPE of 4,096 trained on
Python's docs, saved from scratch: throughput does not depend on the weights, so no pretraining run is needed.

- real-token fraction: real / computed token positions over one epoch of the Trainer's train batches
  (`lmpipe.data.collate.real_token_fraction`; padding-free rows hold no padding by construction);
- answer tokens/s: label tokens (the answer and its EOS; prompts are -100) trained per second, steady state.

    HF_HUB_OFFLINE=1 python benchmarks/qa_padding.py [--train_file data/nq_open_efficientqa_dev.jsonl]
"""  # noqa: E501 (the first line is argparse's --help description, printed as is)

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from datasets import disable_progress_bars

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import StepClock, quiet_trainer  # noqa: E402

from lmpipe.config.arguments import FINETUNE_QA_GROUPS, ModelArguments  # noqa: E402
from lmpipe.config.recipe import parse_recipe
from lmpipe.data.collate import qa_collator, real_token_fraction  # noqa: E402
from lmpipe.data.qa import TRAINING_COLUMNS  # noqa: E402
from lmpipe.data.sources import pydoc_documents  # noqa: E402
from lmpipe.finetune import check_finetune_arguments, prepare_qa_data  # noqa: E402
from lmpipe.loss.reference import IGNORE_INDEX  # noqa: E402
from lmpipe.model.build import build_model  # noqa: E402
from lmpipe.model.tokenizer import train_bpe_tokenizer  # noqa: E402
from lmpipe.training.exact_eval import token_byte_lengths  # noqa: E402
from lmpipe.training.trainer import build_trainer  # noqa: E402

from common import DATA, REPO, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

RECIPE = REPO / "recipes" / "finetune" / "nq_open.yaml"


class CountingCollator:
    """The recipe's collator, recording the answer (label) tokens and computed positions of every batch it makes."""

    def __init__(self, collator):
        self.collator, self.answer_tokens = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.answer_tokens.append(int((batch["labels"] != IGNORE_INDEX).sum()))
        return batch


def save_model(directory: Path) -> Path:
    """The default pretraining architecture, untrained, with a 4,096 BPE trained on Python's docs."""
    tokenizer = train_bpe_tokenizer(pydoc_documents(), 4096)
    model = build_model(ModelArguments(n_positions=128), tokenizer, 128)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


MODES = {
    "padded": ["--batching", "padded", "--train_sampling_strategy", "random"],
    "padded+group_by_length": ["--batching", "padded", "--train_sampling_strategy", "group_by_length"],
    "packed": ["--batching", "packed", "--train_sampling_strategy", "random"],
}


def timed_epoch_part(model_dir: Path, train_file: str, mode: str, steps: int, warmup: int, work: Path) -> dict:
    recipe = parse_recipe([
        str(RECIPE), "--model_name_or_path", str(model_dir), "--train_file", train_file, *MODES[mode],
        "--output_dir", str(work / mode.replace("+", "_")), "--max_steps", str(steps), "--eval_strategy", "no",
        "--eval_on_start", "false", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ], groups=FINETUNE_QA_GROUPS)
    model_args, qa, lora, training = recipe.model, recipe.data, recipe.lora, recipe.training
    template = check_finetune_arguments(model_args, qa, lora)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    data = prepare_qa_data(qa, tokenizer, training, template)
    model = build_model(model_args, tokenizer, qa.max_length)
    collator = CountingCollator(qa_collator(tokenizer, qa.batching))
    trainer = quiet_trainer(build_trainer(
        model, training, data.train.select_columns(TRAINING_COLUMNS), data.validation.select_columns(TRAINING_COLUMNS),
        collator, tokenizer, token_byte_lengths(tokenizer, model.config.vocab_size),
    ))
    fraction = real_token_fraction(  # one epoch of row indices, as the Trainer's sampler batches them
        [len(ids) for ids in data.train["input_ids"]], trainer.get_train_dataloader().batch_sampler, qa.batching
    )
    collator.answer_tokens.clear()
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    timed = clock.step_ends[-1] - clock.step_ends[warmup]
    return {
        "real_token_fraction": fraction,
        "answer_tokens_per_s": sum(collator.answer_tokens[warmup + 1 : steps]) / timed,
        "steps_per_s": (steps - 1 - warmup) / timed,
        "train_examples": len(data.train),
        "batch_size": training.per_device_train_batch_size,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_file", default=str(DATA / "nq_open_efficientqa_dev.jsonl"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    disable_progress_bars()
    torch.manual_seed(0)
    load = load_average()
    runs = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model")
        timed_epoch_part(model_dir, args.train_file, "padded", args.steps, args.warmup, Path(tmp))  # one-time costs
        modes = list(MODES)
        for repeat in range(args.repeats):
            for mode in modes[repeat % len(modes) :] + modes[: repeat % len(modes)]:  # each mode first in turn
                runs[mode].append(
                    timed_epoch_part(model_dir, args.train_file, mode, args.steps, args.warmup, Path(tmp))
                )
                print(f"# {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
    results, rows = {}, []
    for mode in MODES:
        entry = {
            "real_token_fraction": runs[mode][0]["real_token_fraction"],
            "answer_tokens_per_s": summary([r["answer_tokens_per_s"] for r in runs[mode]]),
            "steps_per_s": summary([r["steps_per_s"] for r in runs[mode]]),
        }
        if mode != "padded":
            entry["answer_tokens_per_s_over_padded"] = summary(
                [b["answer_tokens_per_s"] / a["answer_tokens_per_s"] for a, b in zip(runs["padded"], runs[mode])]
            )
        results[mode] = entry
        rows.append([mode, f"{entry['real_token_fraction']:.1%}", fmt(entry["answer_tokens_per_s"], 0),
                     fmt(entry.get("answer_tokens_per_s_over_padded", {"median": None}), 2)])
    print_table(["batching", "real tokens", "answer tokens/s", "/ padded"], rows)
    emit_json({"benchmark": "qa_padding", "recipe": str(RECIPE.relative_to(REPO)), "steps": args.steps,
               "warmup_steps": args.warmup, "repeats": args.repeats, "batch_size": runs["padded"][0]["batch_size"],
               "train_examples": runs["padded"][0]["train_examples"], "machine": machine(),
               "load_average": {"start": load, "end": load_average()}, "results": results})


if __name__ == "__main__":
    main()
