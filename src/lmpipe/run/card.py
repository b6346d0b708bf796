"""The model card (README.md) every run folder carries: Hub metadata, the evaluation, and the recipe that made it.

Written at the end of every run, pushed or not, so a folder copied anywhere still says what it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from lmpipe.config.arguments import DataArguments
from lmpipe.run.files import CARD_NAME, RESOLVED_RECIPE_NAME, write_text_atomically
from lmpipe.run.identity import recorded_resumes

TAGS = ["lmpipe", "gpt2"]

# (metrics.json key, label, format) in the order the card shows them; absent keys are skipped.
EVALUATION_ROWS = [
    ("eval_loss", "eval loss (nats/token, total NLL / scored tokens)", "{:.4f}"),
    ("perplexity", "perplexity (exact, token-weighted)", "{:.2f}"),
    ("bits_per_byte", "bits per byte", "{:.4f}"),
    ("eval_tokens", "scored eval tokens", "{:,}"),
    ("unigram_perplexity", "add-one unigram baseline perplexity", "{:.2f}"),
    ("exact_match", "answer exact match", "{:.2f}"),
    ("f1", "answer token F1", "{:.2f}"),
]
# A preference (DPO) run's evaluation: TRL's DPO loss and implicit rewards on the held-out pairs.
PREFERENCE_ROWS = [
    ("eval_loss", "DPO loss (mean over held-out pairs)", "{:.4f}"),
    ("eval_reward_accuracy", "reward accuracy (share of pairs whose implicit reward favours chosen)", "{:.4f}"),
    ("eval_reward_margin", "reward margin (chosen - rejected)", "{:.4f}"),
    ("validation_pairs", "held-out pairs", "{:,}"),
    ("beta", "beta", "{:g}"),
]
TRAINING_ROWS = [
    ("train_tokens", "training tokens", "{:,}"),
    ("train_steps", "optimizer steps", "{:,}"),
    ("train_runtime_s", "training time (s)", "{:,.1f}"),
    ("train_tokens_per_second", "training tokens / s", "{:,.0f}"),
]
# Metrics that also go into the `model-index` metadata, which the Hub shows as evaluation results.
INDEXED_METRICS = {
    "perplexity": "Perplexity", "bits_per_byte": "Bits per byte", "exact_match": "Exact match", "f1": "F1"
}


def describe_data(recipe: dict[str, Any]) -> tuple[str, list[str]]:
    """The training data as the recipe names it, and the Hub dataset ids among it (for `datasets` metadata)."""
    if recipe.get("train_file"):
        return Path(recipe["train_file"]).name, []
    name = recipe.get("dataset_name") or DataArguments.dataset_name
    return name, [] if name.startswith("builtin:") else [name]


def base_model(recipe: dict[str, Any]) -> str | None:
    """The Hub id the run started from; a local directory is not a Hub reference and is left out."""
    source = recipe.get("model_name_or_path")
    return source if source and not Path(source).exists() else None


def _table(metrics: dict[str, Any], rows: list[tuple[str, str, str]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {label} | {fmt.format(metrics[key])} |" for key, label, fmt in rows if metrics.get(key) is not None]
    return "\n".join(lines)


def render_model_card(
    name: str, metrics: dict[str, Any], recipe_text: str, resumes: Sequence[dict[str, Any]] = ()
) -> ModelCard:
    """Metadata through huggingface_hub's ModelCardData (exact floats from metrics.json), then a short body; the
    recipe is the last session's, and `resumes` (`run.identity.recorded_resumes`) says which keys changed when."""
    recipe = yaml.safe_load(recipe_text) or {}
    data_name, hub_datasets = describe_data(recipe)
    evaluations = [
        EvalResult(
            task_type="text-generation", dataset_type=data_name, dataset_name=data_name, dataset_split="validation",
            metric_type=key, metric_name=label, metric_value=metrics[key],
        )
        for key, label in INDEXED_METRICS.items()
        if metrics.get(key) is not None
    ]
    card_data = ModelCardData(
        library_name="peft" if recipe.get("use_lora") else "transformers",  # an adapter loads through peft
        pipeline_tag="text-generation", tags=TAGS, datasets=hub_datasets or None,
        base_model=base_model(recipe), model_name=name, eval_results=evaluations or None,
    )
    sections = [
        f"# {name}",
        f"A GPT-2 style causal language model trained with lmpipe on `{data_name}`.",
        "## Evaluation\n\nOn the held-out preference pairs (DPO against the model it started from).\n\n"
        + _table(metrics, PREFERENCE_ROWS)
        if "eval_reward_accuracy" in metrics else
        "## Evaluation\n\nOn the held-out validation split, every scored token counted once.\n\n"
        + _table(metrics, EVALUATION_ROWS),
        "## Training\n\n" + _table(metrics, TRAINING_ROWS),
        f"## Recipe\n\nThe resolved recipe (`{RESOLVED_RECIPE_NAME}`) that produced this model:\n\n"
        f"```yaml\n{recipe_text.rstrip()}\n```",
    ]
    if resumes:
        changed = [f"- from step {resume['step']}: {'; '.join(resume['changes'])}" for resume in resumes]
        sections.append("## Resumes\n\nResumed with these keys changed; the recipe above holds their last values.\n\n"
                        + "\n".join(changed))
    body = "\n\n".join(sections)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(output_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Render the card from the folder's `recipe.yaml` and these metrics; written atomically as README.md."""
    folder = Path(output_dir)
    recipe_text = (folder / RESOLVED_RECIPE_NAME).read_text("utf-8")
    card = render_model_card(folder.absolute().name, metrics, recipe_text, recorded_resumes(folder))
    path = folder / CARD_NAME
    write_text_atomically(path, str(card))
    return path
