"""Finding NaN or infinite values: in a live model and optimizer, in checkpoint files, in metrics.

A diverged step leaves non-finite weights whose loss was still finite (the loss is computed before the update),
so the loss alone cannot tell a poisoned checkpoint from a good one. torch and safetensors give `isfinite` and
lazy reads; nothing in the stack names the first bad tensor, which is all this module adds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf; one device sync for the whole lot."""
    names, flags = [], []
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
            names.append(name)
            flags.append(torch.isfinite(tensor.detach()).all())
    if not flags:
        return None
    finite = torch.stack([flag.to(flags[0].device) for flag in flags]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


def _nested_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if torch.is_tensor(value):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _nested_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _nested_tensors(item, f"{prefix}.{index}")


def live_non_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> str | None:
    """'weight NAME' or 'optimizer state NAME' holding a NaN or inf; None when all are finite."""
    bad = first_non_finite(model.named_parameters())
    if bad:
        return f"weight {bad}"
    if optimizer is not None:  # its state is keyed by parameter: name each by the parameter it belongs to
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        state = {names.get(id(parameter), "?"): values for parameter, values in optimizer.state.items()}
        bad = first_non_finite(_nested_tensors(state, ""))
        if bad:
            return f"optimizer state {bad}"
    return None


def file_non_finite(file: Path) -> str | None:
    """'tensor NAME holds NaN or inf' for a safetensors or torch file (loaded with `weights_only`), else None."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as weights:
            # safetensors' safe_open has keys() but is not iterable, so `key in weights` would fail
            bad = first_non_finite((key, weights.get_tensor(key)) for key in weights.keys())  # noqa: SIM118
    elif file.suffix in (".pt", ".pth", ".bin") and file.name.startswith(("optimizer", "pytorch_model")):
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        bad = first_non_finite(_nested_tensors(state, ""))
    else:
        return None
    return f"tensor {bad} holds NaN or inf" if bad else None


def non_finite_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The names of float metrics that are NaN or infinite (JSON has no number for them)."""
    return [key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
