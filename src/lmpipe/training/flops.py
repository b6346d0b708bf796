"""Model FLOP/s and MFU of a training run: nanoGPT's count of FLOPs per token against the device's peak.

Per token: 6 N + 12 L H Q T (N parameters without the position embeddings, the tied head counted once; L layers,
H heads, Q head size, T tokens of context). Padding and -100 positions count as tokens: it is the model's work.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the CUDA device name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def flops_per_token(model: PreTrainedModel, context: int) -> float:
    """6 N + 12 L H Q T for a GPT-2 (peft wrappers included: the base model's config and every parameter)."""
    config = model.config
    wpe = next((p for n, p in model.named_parameters() if n.endswith("wpe.weight")), None)
    parameters = sum(p.numel() for p in model.parameters()) - (wpe.numel() if wpe is not None else 0)
    head_size = config.n_embd // config.n_head
    return 6 * parameters + 12 * config.n_layer * config.n_head * head_size * context


def device_peak_flops(device: torch.device, dtype_is_low_precision: bool) -> float | None:
    """The table's peak for a CUDA device in bf16/fp16; None elsewhere (CPU peaks: measure, `benchmarks/`)."""
    if device.type != "cuda" or not dtype_is_low_precision:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


class ModelFlopsMeter:
    """Achieved model FLOP/s between two training logs (summed over ranks) and MFU against the device's peak."""

    def __init__(self, flops_per_token: float, peak_flops_per_device: float | None):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device
        self._last: tuple[float, int] | None = None

    def rates(self, tokens: int, seconds: float, world_size: int) -> dict[str, float]:
        """`model_tflops` and, with a known peak, `mfu` (% of the peak of all ranks) for `tokens` in `seconds`."""
        achieved = tokens * self.flops_per_token / seconds
        rates = {"model_tflops": achieved / 1e12}
        if self.peak:
            rates["mfu"] = 100 * achieved / (self.peak * world_size)
        return rates

    def add_to_log(self, logs: dict, tokens_seen: int, world_size: int) -> None:
        """A training log (one with `loss`) gets the rates since the previous one; the first only starts the clock."""
        if "loss" not in logs:
            return
        now = time.perf_counter()
        if self._last is not None and now > self._last[0] and tokens_seen > self._last[1]:
            rates = self.rates(tokens_seen - self._last[1], now - self._last[0], world_size)
            logs.update({key: float(f"{value:.4g}") for key, value in rates.items()})
        self._last = (now, tokens_seen)
