"""Where a training step's time goes: torch.profiler over lmpipe's pretraining step, grouped by what the time is for.

Same model and data as train_throughput.py (`ours`). Every operator's self CPU time is put in one group:
attention (SDPA kernels), vocabulary-sized work (LM head matmuls, log-softmax / NLL over the vocabulary, the
embedding gradient), the other matmuls, layer norm / GELU / element-wise, autocast casts, gradient clipping,
the optimizer (everything under `Optimizer.step`), the data loader (everything under its `__next__`); the
rest of the step's wall time is Python and framework overhead outside any operator.

    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --dtype bf16 [--ablate compile:torch_compile=true]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import Setup, flops_per_token, matmul_rate, ours, parse_ablation, quiet_trainer  # noqa: E402

from common import emit_json, load_average, machine, print_table  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
NORMS = ("aten::_foreach_norm", "aten::linalg_vector_norm", "aten::_foreach_mul", "aten::clamp", "aten::stack")
CASTS = ("aten::_to_copy", "aten::to", "aten::copy_")


def ancestor_group(event) -> str | None:
    """Group set by an enclosing record_function: the optimizer step or the data loader."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer (AdamW step)"
        if "DataLoader" in parent.name:
            return "data loader + collate"
        parent = parent.cpu_parent
    return None


def op_group(event, vocab_rows: int) -> str:
    """Group of one operator by its name and input shapes."""
    name = event.name
    shapes = event.input_shapes or []
    if any(vocab_rows in shape for shape in shapes if isinstance(shape, list)):
        return "vocabulary-sized (LM head, loss, embedding grad)"
    if any(part in name for part in ("scaled_dot_product", "flash_attention", "_efficient_attention")):
        return "attention (SDPA)"
    if name.startswith(MATMUL):
        return "matmuls in the blocks"
    if name.startswith(NORMS):
        return "gradient clipping"
    if name.startswith(CASTS):
        return "dtype casts / copies"
    if "layer_norm" in name:
        return "layer norm"
    if "gelu" in name or "tanh" in name:
        return "GELU"
    return "element-wise, other ops"


class StepTimes(TrainerCallback):
    def __init__(self, profiler):
        self.profiler, self.ends = profiler, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.profiler.step()


def profile_steps(setup, dtype: str, overrides: dict, active: int) -> dict:
    trainer = quiet_trainer(ours(setup, dtype, overrides))
    vocab_rows = trainer.model.config.vocab_size
    with profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=setup.warmup, active=active, repeat=1),
        record_shapes=True,
    ) as profiler:
        clock = StepTimes(profiler)
        trainer.add_callback(clock)
        trainer.train()
    # profiler.step() at a step's end opens the next step: the active window is steps warmup+1 .. warmup+active
    # profiler steps 0..warmup-1 are trainer steps 1..warmup; the active window is trainer steps warmup+1..warmup+active
    active_wall = clock.ends[setup.warmup + active - 1] - clock.ends[setup.warmup - 1]
    groups, ops = defaultdict(float), defaultdict(float)
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CPU or event.self_cpu_time_total <= 0:
            continue
        if event.name.startswith(("ProfilerStep", "Optimizer.", "enumerate(DataLoader)")):
            continue  # record_function ranges: their self time is Python, counted in the remainder
        group = ancestor_group(event) or op_group(event, vocab_rows)
        groups[group] += event.self_cpu_time_total / 1e6
        ops[(group, event.name)] += event.self_cpu_time_total / 1e6
    groups["Python / framework outside ops"] = max(0.0, active_wall - sum(groups.values()))
    return {
        "step_s": active_wall / active,
        "tokens_per_s": active * setup.batch * setup.block / active_wall,
        "flops_per_token": flops_per_token(trainer.model, setup.block),
        "groups_s_per_step": {k: v / active for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops_s_per_step": [
            [g, name, v / active] for (g, name), v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]
        ],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--active", type=int, default=6, help="profiled steps")
    parser.add_argument("--ablate", default="", help="NAME:key=value,... recipe overrides for ours")
    parser.add_argument("--gpt2_bpe", action="store_true", help="GPT-2's own 50,257-token BPE, not an 8k trained one")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    size = dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, block_size=256, batch_size=8, warmup=3)
    if args.gpt2_bpe:
        size["vocab_size"] = None
    if args.tiny:
        size = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1024, block_size=64, batch_size=4, warmup=1)
        args.active = 2
    settings = argparse.Namespace(**size, steps=size["warmup"] + args.active + 1, train_file=None)
    _, overrides = parse_ablation(args.ablate) if args.ablate else ("", {})
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(settings, Path(tmp))
        result = profile_steps(setup, args.dtype, overrides, args.active)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        rate = matmul_rate(dtype, 2048, 2048, 2048)
    step = result["step_s"]
    rows = [
        [group, f"{seconds * 1e3:,.1f}", f"{100 * seconds / step:.1f}"]
        for group, seconds in result["groups_s_per_step"].items()
    ]
    print_table(["where", "ms/step", "% of step"], rows)
    print()
    print_table(["operator", "ms/step", "group"],
                [[n, f"{v * 1e3:,.1f}", g] for g, n, v in result["top_ops_s_per_step"]])
    fraction = result["tokens_per_s"] * result["flops_per_token"] / rate
    print(f"{args.dtype} {overrides or ''}: {step * 1e3:.0f} ms/step, {result['tokens_per_s']:.0f} tok/s under the"
          f" profiler = {100 * fraction:.1f}% of the {rate / 1e9:.0f} GFLOP/s {args.dtype} matmul rate")
    emit_json({
        "benchmark": "profile_step", "dtype": args.dtype, "overrides": overrides, "model": size,
        "machine": machine(), "load_average": {"start": load, "end": load_average()},
        "matmul_gflops": rate / 1e9, "fraction_of_matmul": fraction, **result,
    })


if __name__ == "__main__":
    main()
