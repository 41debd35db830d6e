"""Throughput and MFU accounting, and the DVCLive logger of the training curves.

FLOPs per token follow the PaLM appendix B count: 6 × (parameters used in matmuls) for forward + backward, plus
12 × n_layers × d_model × seq_len for the attention score/value products. "Parameters used in matmuls" are the
weights of every nn.Linear (the tied output projection included; lookup-only embeddings excluded).
MFU = achieved FLOP/s ÷ peak FLOP/s; the peak comes from params, a small table of accelerators, or — on CPU — a
short measured matmul in the training precision (so CPU MFU reads as "fraction of this machine's matmul ceiling").
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from torch import nn

# Dense peak FLOP/s (no sparsity) by device-name substring, for bf16/fp16 and fp32 (TF32 off).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 125e12, "fp32": 31.2e12},
    "4090": {"bf16": 165e12, "fp32": 82.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def flops_per_token(model: nn.Module, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    seen: set[int] = set()
    matmul_params = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul_params += module.weight.numel()
    return 6.0 * matmul_params + 12.0 * n_layers * d_model * seq_len


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a square matmul on the CPU (the practical ceiling for dense training here)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 2:
        a @ b
        n += 1
    return 2.0 * size**3 * n / elapsed


def peak_flops(device: torch.device, precision: str, configured: float | None = None) -> float:
    """Peak FLOP/s for MFU: configured value, else the GPU table, else a measured CPU matmul."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_FLOPS.items():
            if key in name:
                return peaks.get(precision, peaks.get("bf16", peaks.get("fp16", 0.0))) or peaks["fp32"]
        return 0.0  # unknown GPU: MFU is reported as 0 rather than guessed
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(dtype)


def truncate_live_history(live_dir: Path, resume_step: int) -> None:
    """Drop DVCLive plot rows logged after checkpoint `resume_step` (a resumed run re-logs them exactly)."""
    plots = Path(live_dir) / "plots" / "metrics"
    if not plots.is_dir():
        return
    for tsv in plots.rglob("*.tsv"):
        with open(tsv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            fields = list(rows[0].keys()) if rows else None
        if fields is None:
            continue
        kept = [row for row in rows if int(row["step"]) <= resume_step]
        with open(tsv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)


class TrainLogger:
    """DVCLive on rank 0 (a no-op elsewhere): per-step scalars into metrics/train/, a summary at the end."""

    def __init__(self, directory: Path | None, resume_step: int = 0):
        self.live = None
        if directory is None:
            return
        from dvclive import Live  # optional dependency (pipeline extra); only rank 0 imports it

        if resume_step > 0:
            truncate_live_history(directory, resume_step)
        # dvcyaml=False: the default would rewrite the root dvc.yaml during `dvc repro`;
        # save_dvc_exp=False: `dvc exp run` already records the experiment.
        self.live = Live(str(directory), dvcyaml=False, save_dvc_exp=False, resume=resume_step > 0,
                         report=None)
        if resume_step > 0:
            self.live.step = resume_step

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.live is None or not values:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def summary(self, values: dict[str, float], keep_existing: bool = False) -> None:
        """Set summary values; `keep_existing`: only those not already in the summary (a resumed run's file)."""
        if self.live is None:
            return
        self.live.summary.update({k: v for k, v in values.items()
                                  if not (keep_existing and k in self.live.summary)})

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
