"""One optimizer step: gradient accumulation over micro-batches, loss scaling, clipping, the non-finite check.

Kept apart from the loop so equivalences can be tested directly: accumulating 4 micro-batches of 2 windows equals
one batch of 8 (each micro loss is divided by the number of micro-steps, and every window has the same number of
targets, so the sum of scaled means is the mean over the whole batch). Under DDP the gradient all-reduce runs only
on the last micro-step (`no_sync` on the others) — the sum is the same, with 1/accum of the communication.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from gpt.train.device import Precision
from gpt.train.distributed import DistInfo, all_reduce_mean, all_reduce_sum


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the global batch (all ranks)
    grad_norm: float  # before clipping
    finite: bool  # False: the update was not applied


def lm_loss(model: nn.Module, windows: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Next-token cross-entropy of windows [B, T+1]: inputs are the first T tokens, targets the last T.

    The model computes the loss (`gpt.model.next_token_loss`, fp32; labels = the whole window, so all T positions
    are scored), adding an MoE load-balancing term in training mode; so T may equal max_seq_len.
    """
    with precision.autocast():
        _, loss = model(windows[:, :-1], labels=windows)
    return loss.float()


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[torch.Tensor],
               precision: Precision, grad_clip: float, info: DistInfo = DistInfo(),
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Accumulate gradients over `micro_batches`, clip, and apply one optimizer step unless the loss is non-finite."""
    accum = len(micro_batches)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, windows in enumerate(micro_batches):
        sync = (i == accum - 1) or not is_ddp
        with contextlib.nullcontext() if sync else model.no_sync():
            loss = lm_loss(model, windows, precision) / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    mean_loss = all_reduce_mean(total, info).item()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # With a GradScaler, inf/nan gradients are routine (the scale is too high): the scaler skips that update itself.
    finite = math.isfinite(mean_loss) and (scaler is not None or math.isfinite(grad_norm))
    if finite:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=mean_loss, grad_norm=grad_norm, finite=finite)


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, precision: Precision, batch_size: int,
                    info: DistInfo = DistInfo()) -> float:
    """Mean next-token loss over fixed windows [N, T+1]; ranks split the rows and the sums are all-reduced."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    mine = windows[info.rank::info.world_size]
    nats = torch.zeros((), dtype=torch.float64, device=windows.device)
    count = torch.zeros((), dtype=torch.float64, device=windows.device)
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        loss = lm_loss(model, batch, precision)
        targets = batch[:, 1:].numel()
        nats += loss.double() * targets
        count += targets
    model.train(was_training)
    nats, count = all_reduce_sum(torch.stack([nats, count]), info).tolist()
    return nats / count if count > 0 else float("nan")
