"""Optimizer and learning-rate schedule.

AdamW (default) with two parameter groups: matrices (Linear weights, embeddings: dim >= 2) get weight decay; biases and norm
gains (dim < 2) don't — decaying them only pulls the model towards a less expressive shape (nanoGPT, GPT-3 paper).

The schedule is a pure function of the step (`lr_at`), so "scheduler state" is just the step number and resuming
cannot drift. Cosine: linear warmup, then cosine decay to `lr * min_lr_ratio`. WSD (warmup-stable-decay, MiniCPM
2024 / Hägele et al. 2024): linear warmup, constant lr, then a linear decay over the last `decay_fraction` of steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gpt.train.config import TrainConfig
from gpt.train.muon import build_muon


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed (dim >= 2) and a non-decayed group; tied weights appear once."""
    decay, no_decay = [], []
    for param in model.parameters():  # .parameters() already deduplicates shared (tied) tensors
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str,
                    precision: str = "bf16") -> torch.optim.Optimizer:
    """cfg.optimizer: AdamW over `param_groups` (the fused CUDA kernel on CUDA), or Muon + AdamW (gpt.train.muon;
    its Newton–Schulz iteration in fp32 when the run's resolved `precision` is fp32, else bf16)."""
    if cfg.optimizer == "muon":
        return build_muon(model, lr=cfg.lr, muon_lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                          betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, momentum=cfg.muon_momentum,
                          ns_dtype="float32" if precision == "fp32" else "bfloat16")
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) under cfg.schedule."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_start = wsd_decay_start(cfg)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_steps - decay_start))
    return cfg.lr - (cfg.lr - min_lr) * progress


def wsd_decay_start(cfg: TrainConfig) -> int | None:
    """The first step of a WSD schedule's decay (None for other schedules)."""
    if cfg.schedule != "wsd":
        return None
    decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
    return max(cfg.warmup_steps, cfg.max_steps - decay_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
