"""Which optimizer a shipped recipe should use: AdamW against Muon + warmup-stable-decay, tuned with equal effort.

Whole runs of one recipe (`python -m lmpipe pretrain RECIPE ...`, as `recipe_ab.py` runs them):
1. AdamW: the recipe with `--adamw_flags` (by default AdamW with a cosine schedule: on a Muon + WSD recipe these
   flags drop its Muon and WSD keys, which gives the recipe as it was before it moved), one run per
   `learning_rate` in `--adamw_lrs`;
2. Muon: the recipe with `--muon_flags` (Muon on the blocks' matrices, AdamW at step 1's best `learning_rate` on
   the rest), one run per `muon_learning_rate` in `--muon_lrs`;
   each sweep adds a rate past an edge that wins (half the lowest or twice the highest, up to `--widen` times), so
   both sides get the same number of trials unless one needs widening;
3. the best of each at `--seeds` (the first is the sweeps' seed), AdamW and Muon interleaved seed by seed, so the
   ratio of their training times is paired on one machine state.
A difference of final eval loss inside the seeds' spread is reported as such. Runs are kept under `--out_dir`
and reused by a rerun with the same flags.

    HF_HUB_OFFLINE=1 python benchmarks/recipe_optimizer.py recipes/pretrain/default.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_per_compute import widened_sweep  # noqa: E402
from recipe_ab import comma_words, run_recipe  # noqa: E402

from common import REPO, emit_json, fmt, load_average, machine, print_table, summary  # noqa: E402

ADAMW_COSINE = "--optimizer,adamw,--lr_scheduler_type,cosine"
MUON_WSD = ("--optimizer,muon,--lr_scheduler_type,warmup_stable_decay,--decay_fraction,0.45,--min_lr_ratio,0.1,"
            "--decay_type,linear")


class Runs:
    """One run folder per name under `out_dir`; a finished run is reused only when it ran with the same flags."""

    def __init__(self, recipe: str, common: list[str], out_dir: Path):
        self.recipe, self.common, self.out_dir = recipe, common, out_dir

    def run(self, name: str, flags: list[str]) -> dict:
        run_dir = self.out_dir / name
        argv = [*self.common, *flags]
        record = run_dir / "benchmark_run.json"
        if record.exists():
            saved = json.loads(record.read_text())
            if (saved["recipe"], saved["flags"]) != (self.recipe, argv):
                raise SystemExit(f"error: {run_dir} ran {saved['recipe']} with {saved['flags']}, not this run: "
                                 "use another --out_dir")
            print(f"# {name}: reused", file=sys.stderr, flush=True)
            return saved["metrics"]
        metrics = run_recipe(self.recipe, argv, run_dir)
        record.write_text(json.dumps({"recipe": self.recipe, "flags": argv, "metrics": metrics}))
        print(f"# {name}: eval loss {metrics['eval_loss']:.4f}, train {metrics['train_runtime_s']:.1f} s",
              file=sys.stderr, flush=True)
        return metrics


def sweep(runs: Runs, name: str, make, lrs: list[str], seed: str, widen: int) -> tuple[str, dict]:
    """Best rate and every rate's run, widened past an edge that wins as quality_per_compute.py's sweeps are."""
    return widened_sweep(lambda lr: runs.run(f"{name}-lr{lr}-seed{seed}", make(lr, seed)), lrs, widen, name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--adamw_lrs", default="1e-3,2e-3,4e-3,8e-3", help="learning_rate values for AdamW")
    parser.add_argument("--muon_lrs", default="4e-3,8e-3,1.6e-2,3.2e-2", help="muon_learning_rate values")
    parser.add_argument("--adamw_flags", default=ADAMW_COSINE, help="flags that make the AdamW side, comma-separated")
    parser.add_argument("--muon_flags", default=MUON_WSD, help="flags that make the Muon side, comma-separated")
    parser.add_argument("--common", default="", help="flags for every run, comma-separated (e.g. --max_steps,200)")
    parser.add_argument("--seeds", default="0,1,2", help="the final comparison's seeds; the first is the sweeps'")
    parser.add_argument("--widen", type=int, default=2, help="rates a sweep may add past an edge that wins")
    parser.add_argument("--out_dir", default=None, help="default outputs/recipe_optimizer/RECIPE_NAME")
    args = parser.parse_args(argv)
    recipe = str(Path(args.recipe).resolve())
    out_dir = Path(args.out_dir or REPO / "outputs" / "recipe_optimizer" / Path(recipe).stem)
    runs = Runs(recipe, comma_words(args.common), out_dir)
    seeds = comma_words(args.seeds)
    load = load_average()

    def adamw(lr: str, seed: str) -> list[str]:
        return [*comma_words(args.adamw_flags), "--learning_rate", lr, "--seed", seed]

    adamw_lr, adamw_sweep = sweep(runs, "adamw", adamw, comma_words(args.adamw_lrs), seeds[0], args.widen)

    def muon(lr: str, seed: str) -> list[str]:
        return [*comma_words(args.muon_flags), "--learning_rate", adamw_lr, "--seed", seed, "--muon_learning_rate", lr]

    muon_lr, muon_sweep = sweep(runs, "muon", muon, comma_words(args.muon_lrs), seeds[0], args.widen)
    finals = {"adamw": [adamw_sweep[adamw_lr]], "muon": [muon_sweep[muon_lr]]}
    for seed in seeds[1:]:  # interleaved: the pair of one seed runs back to back
        finals["adamw"].append(runs.run(f"adamw-lr{adamw_lr}-seed{seed}", adamw(adamw_lr, seed)))
        finals["muon"].append(runs.run(f"muon-lr{muon_lr}-seed{seed}", muon(muon_lr, seed)))

    loss = {side: summary([r["eval_loss"] for r in rs]) for side, rs in finals.items()}
    beyond_spread = loss["muon"]["max"] < loss["adamw"]["min"] or loss["adamw"]["max"] < loss["muon"]["min"]
    winner = min(loss, key=lambda side: loss[side]["median"]) if beyond_spread else None
    time_ratio = summary([m["train_runtime_s"] / a["train_runtime_s"]
                          for a, m in zip(finals["adamw"][1:], finals["muon"][1:])])
    rows = [[side, lr, fmt(loss[side], 4), fmt(summary([r["bits_per_byte"] for r in finals[side]]), 4),
             fmt(summary([r["train_runtime_s"] for r in finals[side]]), 1)]
            for side, lr in (("adamw", adamw_lr), ("muon", muon_lr))]
    for side, swept in (("adamw", adamw_sweep), ("muon", muon_sweep)):
        print(f"{side} sweep (seed {seeds[0]}): " + ", ".join(f"{lr} {r['eval_loss']:.4f}" for lr, r in swept.items()))
    print_table(["optimizer", "best rate", f"eval loss over seeds {args.seeds}", "bits/byte", "train s"], rows)
    print(f"winner beyond the seeds' spread: {winner}; Muon / AdamW train time (paired seeds): {fmt(time_ratio, 3)}")
    emit_json({
        "benchmark": "recipe_optimizer", "recipe": args.recipe, "common_flags": comma_words(args.common),
        "adamw_flags": comma_words(args.adamw_flags), "muon_flags": comma_words(args.muon_flags), "seeds": seeds,
        "machine": machine(),
        "load_average": {"start": load, "end": load_average()},
        "sweeps": {side: {lr: r["eval_loss"] for lr, r in swept.items()}
                   for side, swept in (("adamw", adamw_sweep), ("muon", muon_sweep))},
        "best_rate": {"adamw": adamw_lr, "muon": muon_lr}, "eval_loss": loss,
        "train_runtime_s": {side: summary([r["train_runtime_s"] for r in rs]) for side, rs in finals.items()},
        "muon_over_adamw_train_time": time_ratio, "winner_beyond_seed_spread": winner,
    })


if __name__ == "__main__":
    main()
