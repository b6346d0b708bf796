"""Quality per compute: validation loss against training tokens for AdamW and Muon recipes on the same GPT-2.

Every run is `lmpipe pretrain` with flags (the CLI entry, in this process), on the same model, data, tokenizer
(trained once per corpus by the first run), batch and steps; only how it is optimised changes:

    (a) run_clm's defaults as its users run them: AdamW 5e-5, linear to 0, no warmup, no weight decay;
    (b) AdamW tuned: a learning-rate sweep, warmup, cosine to 10 %, weight decay 0.1, betas (0.9, 0.95);
    (c) optimizer: muon (Muon on the blocks' matrices, AdamW at (b)'s best rate on the rest), its own sweep of
        muon_learning_rate, the same schedule;
    (d) (c)'s best with warmup_stable_decay (decay_fraction, min_lr_ratio 0.1, linear decay);
    (e) the best of (b)-(d) with `document_attention: true` (`--no_document_attention` skips it).

Sweeps use the first seed; the final comparison reruns the best (b), the best (c), (d) and (e) with every seed
(the sweep's runs are reused for the first; (a) runs once). Reported per corpus:
- validation loss against training tokens (evaluated every `--eval_every` steps), the curves in a PNG;
- every final model's loss with each validation document scored on its own (`lmpipe perplexity`), one scale for
  (e), whose training-time evaluation keeps documents apart, and the others, whose evaluation does not;
- tokens-to-target: the tokens (b) needs to reach its own final validation loss over the tokens the best Muon
  variant needs to reach the same loss (per seed; the first evaluation at or below it, linearly interpolated
  between evaluations), median and range; None where it never gets there;
- whether a final-loss difference exceeds the seeds' spread (a smaller one is not a result);
- Muon's cost per training step over AdamW's (forward, backward, clipping and step of the same model in this
  process, interleaved; and the optimizer step alone).

    HF_HUB_OFFLINE=1 python benchmarks/quality_per_compute.py                 # the full comparison
    HF_HUB_OFFLINE=1 python benchmarks/quality_per_compute.py --smoke         # a tiny setting: the whole path runs

A rerun with the same settings and `--out_dir` reuses every finished run (lmpipe returns a finished run's metrics);
a run whose settings changed is replaced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmpipe.cli import main as lmpipe_main  # noqa: E402
from lmpipe.data.sources import load_corpus, split_validation  # noqa: E402
from lmpipe.zero_shot.perplexity import EvaluateArguments, evaluate_file  # noqa: E402

from common import DATA, REPO, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

CORPORA = {  # load_corpus's arguments, which are also the runs' flags
    "shakespeare": {"train_file": str(DATA / "tinyshakespeare.txt"), "sample_by": "paragraph"},
    "pydoc": {"dataset_name": "builtin:pydoc"},
}
VALIDATION_PERCENTAGE = 10
FULL = {  # the model (6 layers x 384) on a budget 2 CPU cores finish in about two and a half hours (35 runs)
    "n_layer": 6, "n_embd": 384, "n_head": 6, "block_size": 128, "batch_size": 16, "steps": 120, "eval_every": 20,
    "vocab": 4096, "max_documents": None, "seeds": "0,1,2",
    "adamw_lrs": "5e-4,1e-3,2e-3,4e-3", "muon_lrs": "1e-3,2e-3,4e-3,8e-3",
}
SMOKE = {
    "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32, "batch_size": 8, "steps": 20, "eval_every": 10,
    "vocab": 300, "max_documents": 100, "seeds": "0", "adamw_lrs": "1e-3,4e-3", "muon_lrs": "2e-3,8e-3",
}


class Runner:
    """Runs one corpus's variants in `out_dir`, the tokenizer trained by the first run and reused by the rest."""

    def __init__(self, corpus: str, settings: argparse.Namespace, out_dir: Path):
        self.corpus, self.s, self.out_dir = corpus, settings, out_dir / corpus
        self.tokenizer_dir: Path | None = None

    def common(self) -> list[str]:
        s = self.s
        flags = [
            *[word for key, value in CORPORA[self.corpus].items() for word in (f"--{key}", value)],
            "--validation_split_percentage", VALIDATION_PERCENTAGE,
            "--n_layer", s.n_layer, "--n_embd", s.n_embd, "--n_head", s.n_head, "--block_size", s.block_size,
            "--n_positions", s.block_size, "--dropout", "0", "--per_device_train_batch_size", s.batch_size,
            "--per_device_eval_batch_size", 2 * s.batch_size, "--max_steps", s.steps, "--max_grad_norm", "1.0",
            "--eval_strategy", "steps", "--eval_steps", s.eval_every, "--save_strategy", "steps",
            "--save_steps", s.steps, "--logging_steps", s.eval_every, "--report_to", "none",
            "--disable_tqdm", "true", "--overwrite_output_dir", "true",  # changed settings replace a run
        ]
        if s.max_documents:
            flags += ["--max_train_documents", s.max_documents]
        if self.tokenizer_dir is None:
            return [*flags, "--train_tokenizer", "true", "--tokenizer_vocab_size", s.vocab]
        return [*flags, "--train_tokenizer", "false", "--tokenizer_name_or_path", str(self.tokenizer_dir)]

    def run(self, name: str, flags: list[str], seed: int) -> dict:
        """One pretraining run; its final metrics and (tokens, validation loss) at every evaluation."""
        run_dir = self.out_dir / f"{name}-seed{seed}"
        argv = ["pretrain", *map(str, self.common()), *map(str, flags), "--seed", str(seed),
                "--output_dir", str(run_dir)]
        start = time.perf_counter()
        if lmpipe_main(argv) != 0:
            raise RuntimeError(f"lmpipe {' '.join(argv)} failed")
        wall = time.perf_counter() - start
        if self.tokenizer_dir is None:
            self.tokenizer_dir = run_dir
        metrics = json.loads((run_dir / "metrics.json").read_text())
        state = json.loads((run_dir / f"checkpoint-{self.s.steps}" / "trainer_state.json").read_text())
        curve = [(row["num_input_tokens_seen"], row["eval_loss"]) for row in state["log_history"] if "eval_loss" in row]
        print(f"# {self.corpus} {name} seed {seed}: eval loss {metrics['eval_loss']:.4f} after "
              f"{metrics['train_tokens']:,} tokens ({wall:.0f} s)", file=sys.stderr, flush=True)
        return {"name": name, "flags": [str(f) for f in flags], "seed": seed, "eval_loss": metrics["eval_loss"],
                "train_tokens": metrics["train_tokens"], "curve": curve, "wall_s": wall, "run_dir": str(run_dir)}

    def documents_alone_loss(self, run: dict) -> float:
        """The run's final model on one yardstick for every variant: `lmpipe perplexity`'s loss per token with each
        validation document scored on its own (the training-time evaluation of (e) keeps documents apart and of the
        others does not, so their eval losses are not on one scale)."""
        validation = self.out_dir / "validation_documents.jsonl"
        if not validation.exists():
            corpus = load_corpus(**{"dataset_name": None, **CORPORA[self.corpus]})
            documents = split_validation(corpus, VALIDATION_PERCENTAGE, self.corpus)["validation"]["text"]
            validation.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
        scored = evaluate_file(EvaluateArguments(model_name_or_path=str(run["run_dir"]),
                                                 validation_file=str(validation), block_size=int(self.s.block_size)))
        return scored["eval_loss"]


def warmup(settings) -> str:
    return str(max(1, round(settings.warmup_fraction * settings.steps)))


def run_clm_defaults(settings) -> list[str]:
    return ["--optimizer", "adamw", "--learning_rate", "5e-5", "--lr_scheduler_type", "linear", "--warmup_steps", "0",
            "--weight_decay", "0", "--adam_beta1", "0.9", "--adam_beta2", "0.999"]


def tuned_adamw(settings, lr: str) -> list[str]:
    return ["--optimizer", "adamw", "--learning_rate", lr, "--lr_scheduler_type", "cosine_with_min_lr",
            "--lr_scheduler_kwargs", json.dumps({"min_lr_rate": 0.1}), "--warmup_steps", warmup(settings),
            "--weight_decay", "0.1", "--adam_beta1", "0.9", "--adam_beta2", "0.95"]


def muon(settings, adamw_lr: str, muon_lr: str) -> list[str]:
    return [*tuned_adamw(settings, adamw_lr), "--optimizer", "muon", "--muon_learning_rate", muon_lr]


def muon_wsd(settings, adamw_lr: str, muon_lr: str) -> list[str]:
    flags = muon(settings, adamw_lr, muon_lr)
    flags[flags.index("cosine_with_min_lr")] = "warmup_stable_decay"
    del flags[flags.index("--lr_scheduler_kwargs"):flags.index("--lr_scheduler_kwargs") + 2]
    return [*flags, "--decay_fraction", str(settings.decay_fraction), "--min_lr_ratio", "0.1",
            "--decay_type", "linear"]


def scaled_rate(rate: str, factor: float) -> str:
    """`rate` x `factor` written as the sweeps write rates (5e-4, 1.6e-2), so a rerun finds the same run folder."""
    mantissa, exponent = f"{float(rate) * factor:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def widened_sweep(run, lrs: list[str], widen: int, label: str) -> tuple[str, dict[str, dict]]:
    """One run per learning rate (`run(rate)` gives its metrics); while the best sits at an edge (up to `widen`
    times), one more rate past that edge (half the lowest or twice the highest). The best rate, and every rate's
    run in rate order."""
    lrs = sorted(lrs, key=float)
    runs = {lr: run(lr) for lr in lrs}
    for _ in range(widen):
        best = min(lrs, key=lambda lr: runs[lr]["eval_loss"])
        if best not in (lrs[0], lrs[-1]):
            break
        added = scaled_rate(best, 0.5 if best == lrs[0] else 2.0)
        lrs = sorted([*lrs, added], key=float)
        runs[added] = run(added)
    best = min(lrs, key=lambda lr: runs[lr]["eval_loss"])
    if best in (lrs[0], lrs[-1]):
        print(f"# {label}: the best rate {best} is still at an edge of the sweep", file=sys.stderr, flush=True)
    return best, {lr: runs[lr] for lr in lrs}


def sweep(runner: Runner, name: str, make, lrs: list[str], seed: int, widen: int) -> tuple[str, list[str], list[dict]]:
    """`widened_sweep` of one variant on one corpus: the best rate, the rates run in order, and their runs."""
    best, runs = widened_sweep(lambda lr: runner.run(f"{name}-lr{lr}", make(lr), seed), lrs, widen,
                               f"{runner.corpus} {name}")
    return best, list(runs), list(runs.values())


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Training tokens at which the validation loss first reaches `target`, linear between evaluations."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def compare_corpus(corpus: str, settings, out_dir: Path) -> dict:
    runner = Runner(corpus, settings, out_dir)
    seeds = [int(s) for s in settings.seeds.split(",")]
    first = seeds[0]
    finals: dict[str, list[dict]] = {"a": [runner.run("a-run_clm", run_clm_defaults(settings), first)]}
    lrs = {"b": settings.adamw_lrs.split(","), "c": settings.muon_lrs.split(",")}
    adamw_lr, lrs["b"], b_sweep = sweep(runner, "b-adamw", lambda lr: tuned_adamw(settings, lr), lrs["b"], first,
                                        settings.widen)
    muon_lr, lrs["c"], c_sweep = sweep(runner, "c-muon", lambda lr: muon(settings, adamw_lr, lr), lrs["c"], first,
                                       settings.widen)
    finals["b"] = [next(r for r in b_sweep if r["name"] == f"b-adamw-lr{adamw_lr}")]
    finals["c"] = [next(r for r in c_sweep if r["name"] == f"c-muon-lr{muon_lr}")]
    variants = {
        "a": ("a-run_clm", run_clm_defaults(settings)),
        "b": (f"b-adamw-lr{adamw_lr}", tuned_adamw(settings, adamw_lr)),
        "c": (f"c-muon-lr{muon_lr}", muon(settings, adamw_lr, muon_lr)),
        "d": (f"d-muon-wsd-lr{muon_lr}", muon_wsd(settings, adamw_lr, muon_lr)),
    }
    finals["d"] = [runner.run(*variants["d"], first)]
    if not settings.no_document_attention:
        best = min("bcd", key=lambda v: finals[v][0]["eval_loss"])
        variants["e"] = (f"e-{variants[best][0]}-docattn", [*variants[best][1], "--document_attention", "true"])
        finals["e"] = [runner.run(*variants["e"], first)]
    seeded = dict.fromkeys(variants, seeds) | {"a": seeds[:1], "e": seeds[: settings.document_attention_seeds]}
    for seed in seeds[1:]:  # (a) is a reference point, run once: the ratios and spreads are between (b)-(e)
        for key, (name, flags) in variants.items():
            if seed in seeded[key]:
                finals[key].append(runner.run(name, flags, seed))
    for run in (run for runs in finals.values() for run in runs):
        run["documents_alone_loss"] = runner.documents_alone_loss(run)
    result = analyse(corpus, finals, variants, {"b": b_sweep, "c": c_sweep}, adamw_lr, muon_lr)
    edges = {key: best in (values[0], values[-1]) for key, values, best in (("b", lrs["b"], adamw_lr),
                                                                            ("c", lrs["c"], muon_lr))}
    return {**result, "best_rate_at_sweep_edge": edges}


def analyse(corpus, finals, variants, sweeps, adamw_lr, muon_lr) -> dict:
    final_loss = {key: summary([r["eval_loss"] for r in runs]) for key, runs in finals.items()}
    best_muon = min((k for k in "cd" if k in finals), key=lambda k: final_loss[k]["median"])
    ratios, reach = [], {key: [] for key in finals}
    for index, b_run in enumerate(finals["b"]):
        target = b_run["curve"][-1][1]  # (b)'s own final validation loss, seed by seed
        for key, runs in finals.items():
            reach[key].append(tokens_to_reach(runs[index]["curve"], target) if index < len(runs) else None)
        b_tokens, muon_tokens = reach["b"][-1], reach[best_muon][-1]
        ratios.append(b_tokens / muon_tokens if muon_tokens else None)
    spread = lambda k: final_loss[k]["max"] - final_loss[k]["min"]  # noqa: E731
    gap = final_loss["b"]["median"] - final_loss[best_muon]["median"]
    return {
        "corpus": corpus,
        "variants": {key: name for key, (name, _) in variants.items()},
        "best_adamw_lr": adamw_lr, "best_muon_lr": muon_lr, "best_muon_variant": best_muon,
        "sweep_final_loss": {key: {r["name"]: r["eval_loss"] for r in runs} for key, runs in sweeps.items()},
        "final_eval_loss": final_loss,
        "final_documents_alone_loss": {key: summary([r["documents_alone_loss"] for r in runs])
                                       for key, runs in finals.items()},
        "tokens_to_b_final": {key: summary(values) for key, values in reach.items()},
        "b_tokens_over_best_muon_tokens": summary(ratios),
        "b_minus_best_muon_final_loss": gap,
        "difference_beyond_seed_spread": abs(gap) > max(spread("b"), spread(best_muon)),
        "curves": {key: [{"seed": r["seed"], "curve": r["curve"]} for r in runs] for key, runs in finals.items()},
    }


def step_cost(settings, vocab: int, repeats: int) -> dict:
    """ms per training step (forward, backward, clipping, step, zero_grad) of the benchmark's model with the
    Trainer's AdamW and with lmpipe's Muon + AdamW, interleaved step by step after 2 untimed steps each; and the
    optimizer step alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmpipe.loss.install import install_chunked_loss
    from lmpipe.training.optimizers import muon_with_adamw

    torch.manual_seed(0)
    s = settings
    config = GPT2Config(vocab_size=vocab, n_positions=int(s.block_size), n_embd=int(s.n_embd),
                        n_layer=int(s.n_layer), n_head=int(s.n_head), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(config)
    install_chunked_loss(model, True, None)
    decay = {n for n, _ in model.named_parameters() if "bias" not in n and ".ln_" not in n and "ln_f" not in n}
    args = argparse.Namespace(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                              optim="adamw_torch_fused", muon_learning_rate=None, muon_weight_decay=None,
                              muon_momentum=None, muon_nesterov=None, muon_ns_steps=None)
    named = list(model.named_parameters())
    optimizers = {
        "adamw": torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
                                    {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                                   lr=1e-3, betas=(0.9, 0.95), fused=True),
        "muon": muon_with_adamw(model, args, decay),
    }
    ids = torch.randint(0, vocab, (int(s.batch_size), int(s.block_size)))
    times = {name: {"step": [], "optimizer": []} for name in optimizers}
    for index in range(repeats + 2):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            before_step = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad()
            end = time.perf_counter()
            if index >= 2:
                times[name]["step"].append(1000 * (end - start))
                times[name]["optimizer"].append(1000 * (end - before_step))
    ratio = [m / a for m, a in zip(times["muon"]["step"], times["adamw"]["step"])]
    optimizer_ratio = [m / a for m, a in zip(times["muon"]["optimizer"], times["adamw"]["optimizer"])]
    return {
        "ms_per_step": {name: summary(t["step"]) for name, t in times.items()},
        "ms_optimizer_step": {name: summary(t["optimizer"]) for name, t in times.items()},
        "muon_over_adamw_step": summary(ratio), "muon_over_adamw_optimizer_step": summary(optimizer_ratio),
        "steps_timed": repeats,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"a": "(a) run_clm defaults", "b": "(b) AdamW tuned", "c": "(c) Muon + AdamW", "d": "(d) Muon + WSD",
              "e": "(e) best + document attention"}
    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, result in zip(axes[0], results):
        for key, runs in result["curves"].items():
            tokens = [t for t, _ in runs[0]["curve"]]
            losses = [[loss for _, loss in r["curve"]] for r in runs]
            middle = [statistics.median(column) for column in zip(*losses)]
            line, = axis.plot(tokens, middle, marker=".", label=f"{labels[key]}: {result['variants'][key]}")
            if len(runs) > 1:
                axis.fill_between(tokens, [min(c) for c in zip(*losses)], [max(c) for c in zip(*losses)],
                                  color=line.get_color(), alpha=0.2)
        target = result["final_eval_loss"]["b"]["median"]
        axis.axhline(target, linestyle="--", color="gray", label="(b)'s final validation loss")
        finals = [loss for runs in result["curves"].values() for r in runs for _, loss in r["curve"][-1:]]
        axis.set_ylim(min(finals) - 0.2, max(finals) + 1.0)
        axis.set(title=result["corpus"], xlabel="training tokens", ylabel="validation loss (nats/token)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny setting: defaults below")
    parser.add_argument("--corpora", default="shakespeare,pydoc", help=f"comma-separated, of {', '.join(CORPORA)}")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", default=None, help=f"default {value} (smoke: {SMOKE[key]})")
    parser.add_argument("--warmup_fraction", type=float, default=0.05)
    parser.add_argument("--decay_fraction", type=float, default=0.45, help="(d)'s warmup_stable_decay decay")
    parser.add_argument("--widen", type=int, default=2, help="rates a sweep may add past an edge that wins")
    parser.add_argument("--no_document_attention", action="store_true", help="skip (e)")
    parser.add_argument("--document_attention_seeds", type=int, default=None, help="run (e) with the first N seeds")
    parser.add_argument("--cost_steps", type=int, default=None, help="timed steps per optimizer (default 20, smoke 3)")
    parser.add_argument("--out_dir", default=str(REPO / "outputs" / "quality_per_compute"))
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out_dir = Path(args.out_dir) / ("smoke" if args.smoke else "full")
    load = load_average()
    results = [compare_corpus(corpus, args, out_dir) for corpus in args.corpora.split(",")]
    cost = step_cost(args, int(args.vocab), args.cost_steps or (3 if args.smoke else 20))
    plot_path = out_dir / "quality_per_compute.png"
    plot(results, plot_path)
    rows = []
    for r in results:
        for key, name in r["variants"].items():
            to_target = r["tokens_to_b_final"][key]
            rows.append([r["corpus"], f"({key}) {name}", fmt(r["final_eval_loss"][key], 4),
                         fmt(r["final_documents_alone_loss"][key], 4), fmt(to_target, 0)])
    print_table(["corpus", "variant", "final val loss median (range)", "each document alone", "tokens to (b)'s final"],
                rows)
    for r in results:
        print(f"{r['corpus']}: tokens (b) / tokens best Muon ({r['best_muon_variant']}) to (b)'s final loss: "
              f"{fmt(r['b_tokens_over_best_muon_tokens'], 2)}; final-loss gap beyond the seeds' spread: "
              f"{r['difference_beyond_seed_spread']}")
    print(f"Muon / AdamW per training step: {fmt(cost['muon_over_adamw_step'], 3)} "
          f"(optimizer step alone {fmt(cost['muon_over_adamw_optimizer_step'], 2)})")
    keys = [*FULL, "warmup_fraction", "decay_fraction", "widen", "corpora", "smoke"]
    settings = {key: getattr(args, key) for key in keys}
    emit_json({"benchmark": "quality_per_compute", "settings": settings, "plot": str(plot_path),
               "machine": machine(),
               "load_average": {"start": load, "end": load_average()}, "results": results, "step_cost": cost})


if __name__ == "__main__":
    main()
