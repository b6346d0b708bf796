"""Quality per compute: Tiny Shakespeare validation loss in nats per character after a ~3 minute training budget.

Runs `recipes/pretrain/shakespeare_3min.yaml` end to end (tokenizer training, packing, training, exact evaluation)
and converts its exact eval loss to nats per character, the unit of nanoGPT's character-level "baby GPT"
(1.88 validation loss after ~3 minutes on a laptop CPU):

    nats/char = total NLL of the scored validation tokens / characters those tokens stand for

The scored tokens are every block position but the first (the run's `eval_tokens`, recounted here from the same
validation blocks). Their characters are their UTF-8 bytes (the text is ASCII) plus 2 for every scored
`<|endoftext|>` between speeches: speeches are split at blank lines, and the EOS stands in for that "\\n\\n".

    HF_HUB_OFFLINE=1 python benchmarks/shakespeare_quality.py [--train_file data/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_ab import comma_words, run_recipe  # noqa: E402

from lmpipe.config.arguments import TokenizerArguments  # noqa: E402
from lmpipe.config.recipe import parse_recipe
from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents  # noqa: E402
from lmpipe.data.sources import load_corpus, split_validation  # noqa: E402
from lmpipe.model.tokenizer import load_tokenizer  # noqa: E402
from lmpipe.training.exact_eval import token_byte_lengths  # noqa: E402

from common import DATA, REPO, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

RECIPE = REPO / "recipes" / "pretrain" / "shakespeare_3min.yaml"
NANOGPT_BABY_GPT_NATS_PER_CHAR = 1.88


def scored_characters(recipe: str, flags: list[str], run_dir: Path) -> dict:
    """Rebuild the run's validation blocks with its saved tokenizer; count scored tokens, bytes and EOS."""
    data = parse_recipe([recipe, *flags, "--output_dir", str(run_dir)]).data
    tokenizer = load_tokenizer(TokenizerArguments(tokenizer_name_or_path=str(run_dir)))
    corpus = split_validation(
        load_corpus(None, train_file=data.train_file, sample_by=data.sample_by),
        data.validation_split_percentage, "data",
    )
    tokenized = tokenize_documents(corpus["validation"], tokenizer, data.text_column)
    stream_length = sum(len(ids) for ids in tokenized["input_ids"])
    blocks = blocks_as_array(pack_blocks(tokenized, data.block_size, "validation"))
    targets = blocks[:, 1:]
    byte_lengths = token_byte_lengths(tokenizer)
    is_eos = targets == tokenizer.eos_token_id
    if blocks.size == stream_length:  # the split's final EOS ends the file: it stands for no characters
        is_eos[-1, -1] = False
    n_bytes = int(byte_lengths[targets].sum())
    return {
        "scored_tokens": int(targets.size), "scored_bytes": n_bytes, "scored_separators": int(is_eos.sum()),
        "characters": n_bytes + 2 * int(is_eos.sum()),
        "validation_characters": sum(len(t) for t in corpus["validation"][data.text_column]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_file", default=str(DATA / "tinyshakespeare.txt"))
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flags", default="", help="extra recipe flags, comma-separated (e.g. --max_steps,10)")
    args = parser.parse_args(argv)
    flags = ["--train_file", args.train_file, *comma_words(args.flags)]
    load = load_average()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            metrics = run_recipe(args.recipe, flags, run_dir)
            counted = scored_characters(args.recipe, flags, run_dir)
        if counted["scored_tokens"] != metrics["eval_tokens"]:
            raise RuntimeError(f"recount {counted['scored_tokens']} != the run's eval_tokens {metrics['eval_tokens']}")
        total_nll = metrics["eval_loss"] * metrics["eval_tokens"]
        runs.append({**metrics, **counted, "nats_per_char": total_nll / counted["characters"],
                     "bits_per_byte_check": total_nll / math.log(2) / counted["scored_bytes"]})
        r = runs[-1]
        print(f"# train {r['train_runtime_s']:.0f} s, wall {r['wall_s']:.0f} s, eval loss {r['eval_loss']:.4f}"
              f" nats/token, {r['nats_per_char']:.4f} nats/char", file=sys.stderr, flush=True)
    result = {
        "nats_per_char": summary([r["nats_per_char"] for r in runs]),
        "eval_loss_nats_per_token": summary([r["eval_loss"] for r in runs]),
        "bits_per_byte": summary([r["bits_per_byte"] for r in runs]),
        "train_runtime_s": summary([r["train_runtime_s"] for r in runs]),
        "wall_s": summary([r["wall_s"] for r in runs]),
        "train_tokens": runs[0]["train_tokens"],
        "characters_per_token": runs[0]["characters"] / runs[0]["scored_tokens"],
        "scored_characters": runs[0]["characters"],
        "validation_characters": runs[0]["validation_characters"],
        "bits_per_byte_recount_matches": bool(np.allclose([r["bits_per_byte"] for r in runs],
                                                          [r["bits_per_byte_check"] for r in runs], rtol=1e-9)),
    }
    print_table(
        ["what", "nats/char", "nats/token", "train s", "wall s"],
        [["ours: " + Path(args.recipe).name, fmt(result["nats_per_char"], 3),
          fmt(result["eval_loss_nats_per_token"], 3), fmt(result["train_runtime_s"], 0), fmt(result["wall_s"], 0)],
         ["nanoGPT baby GPT (README, char-level)", f"{NANOGPT_BABY_GPT_NATS_PER_CHAR:.2f}", "", "~180 (laptop)", ""]],
    )
    emit_json({"benchmark": "shakespeare_quality", "recipe": str(Path(args.recipe).resolve().relative_to(REPO)),
               "flags": flags, "repeats": args.repeats, "nanogpt_nats_per_char": NANOGPT_BABY_GPT_NATS_PER_CHAR,
               "machine": machine(), "load_average": {"start": load, "end": load_average()}, "results": result})


if __name__ == "__main__":
    main()
