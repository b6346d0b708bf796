"""Held-out preference accuracy and margin of a DPO policy against its reference, and both models' QA scores.

    HF_HUB_OFFLINE=1 python benchmarks/preference_eval.py --policy outputs/dpo-nq-open \
        [--reference outputs/finetune-nq-open] [--pairs data/nq_open_preferences_heldout.jsonl]

For each pair {prompt, chosen, rejected} and each model, an answer's log-probability is the sum over the answer's
tokens and its EOS of log p(token | prompt, earlier answer tokens): prompt and answer tokenised apart and their ids
concatenated (as `lmpipe finetune-qa` and DPO train), `log_softmax` + `gather` at the answer positions only
(`lmpipe.loss.reference`, never the model's own loss). Reported:

- implicit reward (policy vs reference): the share of pairs with beta * ((pi_c - ref_c) - (pi_r - ref_r)) > 0 (ties,
  e.g. a policy equal to its reference, count as wrong, as TRL's reward accuracy counts them) and its mean;
- per model: the share of pairs whose chosen answer is likelier than the rejected one and the mean log-probability
  margin (the reference's figure is the "before DPO" one: its implicit reward against itself is 0 by definition);
  greedy exact match and F1 against every accepted answer (`--answers`' rows whose question renders to the pair's
  prompt), as `lmpipe finetune-qa` scores them; and the answer perplexity, exp of the mean chosen-answer NLL per
  token (answer + EOS), token-weighted over the pairs.

The reference defaults to the model the policy was trained from (`model_name_or_path` in its `recipe.yaml`), beta
to the policy's recipe's `beta` (else TRL's default, 0.1). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmpipe.data.qa import DEFAULT_TEMPLATE  # noqa: E402
from lmpipe.errors import LmpipeError  # noqa: E402
from lmpipe.finetune import evaluate_qa  # noqa: E402
from lmpipe.generate import load_for_generation  # noqa: E402
from lmpipe.loss.reference import IGNORE_INDEX, shifted_token_nll  # noqa: E402
from lmpipe.model.tokenizer import plain_text_ids  # noqa: E402

from common import DATA, emit_json, load_average, machine, print_table  # noqa: E402

TRL_DEFAULT_BETA = 0.1
FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: Path) -> list[dict[str, str]]:
    """The rows of a JSONL preference file, each {prompt, chosen, rejected} as non-empty strings."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LmpipeError(f"{path}: cannot read ({e.strerror})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmpipeError(f"{path} row {number}: not JSON ({e.msg})") from None
        for field in FIELDS:
            value = row.get(field) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise LmpipeError(f"{path} row {number}: '{field}' must be a non-empty string")
        pairs.append({field: row[field] for field in FIELDS})
    if not pairs:
        raise LmpipeError(f"{path}: no preference pairs")
    return pairs


def accepted_answers(pairs: list[dict[str, str]], answers_file: Path, template: str) -> list[tuple[str, list[str]]]:
    """(question, accepted answers) of each pair: the row of `answers_file` whose question renders to its prompt."""
    rows = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_prompt = {template.format(question=row["question"]): (row["question"], row["answer"]) for row in rows}
    found = []
    for number, pair in enumerate(pairs, start=1):
        if pair["prompt"] not in by_prompt:
            raise LmpipeError(f"pair {number}: its prompt is no question of {answers_file} rendered as {template!r}")
        found.append(by_prompt[pair["prompt"]])
    return found


def encode(tokenizer, prompts: list[str], answers: list[str], positions: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: prompt ids + answer ids + EOS, labels -100 on the prompt; a prompt too long for
    `positions` loses tokens from its left, as in QA fine-tuning."""
    rows = []
    for number, (prompt_ids, answer_ids) in enumerate(
        zip(plain_text_ids(tokenizer, prompts), plain_text_ids(tokenizer, answers)), start=1
    ):
        target = answer_ids + [tokenizer.eos_token_id]
        room = positions - len(target)
        if room < 1:
            raise LmpipeError(f"pair {number}: an answer of {len(target)} tokens + EOS leaves no room for its prompt")
        prompt_ids = prompt_ids[-room:]
        rows.append((prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target))
    return rows


@torch.inference_mode()
def answer_log_probs(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 16):
    """(summed log-probability of each answer + EOS given its prompt, its number of tokens), row by row in order.

    Batches are padded on the right with EOS, masked there by position (labels -100, attention 0: EOS is also the
    answer's end, which is scored), so a row's numbers do not depend on its batch."""
    rows = encode(tokenizer, prompts, answers, model.config.n_positions)
    log_probs, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.eos_token_id)
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (ids, row_labels) in enumerate(batch):
            input_ids[b, : len(ids)], labels[b, : len(ids)] = torch.tensor(ids), torch.tensor(row_labels)
            attention_mask[b, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        nll, kept = shifted_token_nll(logits, labels.to(model.device))
        log_probs += (-nll.double().sum(dim=1)).tolist()
        counts += kept.sum(dim=1).tolist()
    return log_probs, counts


def implicit_reward(policy: dict, reference: dict, beta: float) -> dict:
    """Accuracy (share of margins > 0) and mean of beta * ((pi_c - ref_c) - (pi_r - ref_r)) over the pairs."""
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip(policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"])
    ]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "mean_margin": sum(margins) / len(margins)}


def score_model(directory: str, pairs: list[dict], questions: list[tuple[str, list[str]]], args) -> dict:
    """One model's answer log-probabilities, its preference of chosen over rejected, QA scores and perplexity."""
    model, tokenizer = load_for_generation(directory)
    model.eval()
    prompts = [pair["prompt"] for pair in pairs]
    chosen, counts = answer_log_probs(model, tokenizer, prompts, [p["chosen"] for p in pairs], args.batch_size)
    rejected, _ = answer_log_probs(model, tokenizer, prompts, [p["rejected"] for p in pairs], args.batch_size)
    rows = encode(tokenizer, prompts, [p["chosen"] for p in pairs], model.config.n_positions)
    examples = Dataset.from_dict({
        "input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows], "prompt": prompts,
        "question": [q for q, _ in questions], "answers": [a for _, a in questions],
    })
    qa, _ = evaluate_qa(model, tokenizer, examples, args.max_new_tokens, args.batch_size, seed=0)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "model": directory,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_preferred": sum(m > 0 for m in margins) / len(margins),
        "mean_log_prob_margin": sum(margins) / len(margins),
        "exact_match": qa["exact_match"],
        "f1": qa["f1"],
        "answer_perplexity": math.exp(-sum(chosen) / sum(counts)),
        "answer_tokens": sum(counts),
    }


def run_recipe(directory: str) -> dict:
    """The policy run's resolved recipe (`recipe.yaml`), or {} when it has none."""
    path = Path(directory) / "recipe.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="the trained (DPO) model directory")
    parser.add_argument("--reference", help="the reference model directory (default: the policy's recipe's "
                        "model_name_or_path, the model it was trained from)")
    parser.add_argument("--pairs", type=Path, default=DATA / "nq_open_preferences_heldout.jsonl",
                        help="held-out preference pairs (JSONL of prompt / chosen / rejected)")
    parser.add_argument("--answers", type=Path, default=DATA / "nq_open_efficientqa_dev.jsonl",
                        help="QA rows {question, answer: [accepted, ...]} the pairs' prompts were rendered from")
    parser.add_argument("--prompt_template", default=DEFAULT_TEMPLATE, help="how a question renders to a prompt")
    parser.add_argument("--beta", type=float, help="DPO beta (default: the policy's recipe's, else 0.1)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="greedy answer length for exact match")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N pairs (a quick look)")
    args = parser.parse_args(argv)
    try:
        recipe = run_recipe(args.policy)
        reference = args.reference or recipe.get("model_name_or_path")
        if not reference:
            raise LmpipeError(f"{args.policy}: no recipe.yaml naming the model it was trained from; pass --reference")
        beta = args.beta if args.beta is not None else float(recipe.get("beta", TRL_DEFAULT_BETA))
        pairs = read_pairs(args.pairs)[: args.limit]
        questions = accepted_answers(pairs, args.answers, args.prompt_template)
        load_start = load_average()
        models = {"reference": score_model(reference, pairs, questions, args),
                  "policy": score_model(args.policy, pairs, questions, args)}
    except LmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reward = implicit_reward(models["policy"], models["reference"], beta)
    print(f"{len(pairs)} held-out pairs from {args.pairs}; implicit reward of the policy against the reference "
          f"(beta {beta}): accuracy {100 * reward['accuracy']:.1f} %, mean margin {reward['mean_margin']:.4f}")
    print_table(
        ["model", "dir", "chosen likelier %", "mean log-p margin", "EM", "F1", "answer ppl"],
        [[name, m["model"], f"{100 * m['chosen_preferred']:.1f}", f"{m['mean_log_prob_margin']:.3f}",
          f"{m['exact_match']:.1f}", f"{m['f1']:.1f}", f"{m['answer_perplexity']:.2f}"] for name, m in models.items()],
    )
    emit_json({
        "benchmark": "preference_eval", "pairs_file": str(args.pairs), "pairs": len(pairs), "beta": beta,
        "implicit_reward": reward,
        "models": {name: {k: v for k, v in m.items() if k not in ("chosen", "rejected")} for name, m in models.items()},
        "machine": machine(), "load_average": [load_start, load_average()],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
