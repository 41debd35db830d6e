"""Device selection, mixed precision and seeding for training and evaluation.

Mixed precision keeps fp32 master weights and runs matmuls under `torch.autocast`: bf16 on CUDA (when supported)
and on CPUs with bf16 matrix units (~1.5x training throughput here), fp16 plus a GradScaler on older GPUs (fp16's
small exponent range underflows gradients without loss scaling). `precision: auto` picks the fastest safe one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random

import numpy as np
import torch

from gpt.config import ConfigError


def select_device(requested: str = "auto") -> torch.device:
    """`auto` → cuda, then mps, then cpu; an explicit device that isn't available is a clear error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ConfigError(f"device: {requested!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested!r} requested but CUDA is not available (use auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {requested!r} requested but MPS is not available (use auto or cpu)")
    return device


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map `auto` to fp32/bf16/fp16 for this device. fp16 works on CUDA and (slowly, mainly to test the GradScaler
    path without a GPU) on CPU."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_supports_bf16() else "fp32"
        return "fp32"
    if requested == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"precision: fp16 with loss scaling needs CUDA or CPU (got {device.type}); use fp32")
    return requested


@dataclasses.dataclass(frozen=True)
class Precision:
    """A resolved precision: how to run the forward pass and whether gradients need loss scaling."""

    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed for the RNG draws (dropout) of one optimizer step on one rank: resuming at any step reproduces them."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63
