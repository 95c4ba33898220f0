"""Tokens per second, achieved FLOP/s and MFU over each log interval (adds fields to the log metrics).

The clock is the time spent inside training steps (data wait included), so evaluations and checkpoint saves
inside an interval do not dilute the figure. MFU (model FLOPs utilization: achieved FLOP/s over the devices'
peak) is logged where the peak is known: GPUs of PEAK_FLOPS at the run's precision; not on CPU.
"""

from __future__ import annotations

from typing import Any

from pretrain.core.callbacks.base import MEASURE, Callback, Rollback, TrainerView

# Dense peak FLOP/s of one GPU (no sparsity) by a fragment of its CUDA name and the run's precision, from the
# vendors' data sheets; the first fragment found in the name wins (H100 PCIe before H100, the SXM part). fp32
# is the plain (non-TF32) rate: PyTorch does not use TF32 for matrix products by default.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """One device's peak FLOP/s at this precision, or None when unknown."""
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in device_name:
            return peaks.get(precision)
    return None


class Throughput(Callback):
    order = MEASURE

    def __init__(self, flops_per_token: float, precision: str = "fp32") -> None:
        self.flops_per_token = flops_per_token
        self.precision = precision
        self.peak: float | None = None  # all devices' peak FLOP/s, where known
        self._seconds = 0.0
        self._tokens = 0

    def on_train_start(self, trainer: TrainerView) -> None:
        self._seconds, self._tokens = trainer.step_seconds, trainer.state.consumed_tokens
        device = trainer.world.device
        if device.type == "cuda":
            import torch

            one = peak_flops(torch.cuda.get_device_name(device), self.precision)
            self.peak = one * trainer.world.world_size if one else None

    def on_log(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        tokens = trainer.state.consumed_tokens - self._tokens
        seconds = max(trainer.step_seconds - self._seconds, 1e-9)
        metrics["tokens_per_second"] = tokens / seconds
        metrics["flops_per_second"] = tokens * self.flops_per_token / seconds
        if self.peak:
            metrics["mfu"] = metrics["flops_per_second"] / self.peak
        self._seconds, self._tokens = trainer.step_seconds, trainer.state.consumed_tokens

    def on_rollback(self, trainer: TrainerView, rollback: Rollback) -> None:
        self.on_train_start(trainer)  # the token count went back to the checkpoint's
