"""One optimizer step: gradient accumulation over micro-batches, loss scaling, clipping, the non-finite check.

Kept apart from the loop so equivalences can be tested directly: accumulating 4 micro-batches of 2 windows equals
one batch of 8 (each micro loss is divided by the number of micro-steps, and every window has the same number of
targets, so the sum of scaled means is the mean over the whole batch). Under DDP the gradient all-reduce runs only
on the last micro-step (`no_sync` on the others) — the sum is the same, with 1/accum of the communication.

A batch is either plain windows [B, T+1] (pretraining: every next token is scored) or `LabeledWindows`: windows
plus labels of the same shape with -100 where nothing is scored (supervised fine-tuning scores only assistant
tokens, gpt/sft/). Labeled micro-batches score different numbers of tokens, so each micro loss is weighted by its
share of the step's scored tokens instead of 1/accum: the step's loss is then the mean over every scored token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from gpt.model.loss import IGNORE_INDEX, next_token_loss
from gpt.train.device import Precision
from gpt.train.distributed import DistInfo, all_reduce_mean, all_reduce_sum


@dataclasses.dataclass(frozen=True)
class LabeledWindows:
    """Token windows [B, T+1] and their labels [B, T+1]: labels[:, t] is the target of position t - 1, -100 where
    nothing is scored (gpt.model.loss.IGNORE_INDEX). Moves and splits like a tensor (`to`, `chunk`, slicing)."""

    windows: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> LabeledWindows:
        return LabeledWindows(self.windows.to(device, non_blocking=non_blocking),
                              self.labels.to(device, non_blocking=non_blocking))

    def chunk(self, n: int) -> list[LabeledWindows]:
        return [LabeledWindows(w, lab) for w, lab in zip(self.windows.chunk(n), self.labels.chunk(n), strict=True)]

    def __getitem__(self, index: slice) -> LabeledWindows:
        return LabeledWindows(self.windows[index], self.labels[index])

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def device(self) -> torch.device:
        return self.windows.device

    def scored(self) -> torch.Tensor:
        """How many targets are scored (a 0-d tensor)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum()


Batch = torch.Tensor | LabeledWindows


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the global batch (all ranks)
    grad_norm: float  # before clipping
    finite: bool  # False: the update was not applied


def lm_loss(model: nn.Module, windows: Batch, precision: Precision) -> torch.Tensor:
    """Next-token cross-entropy of windows [B, T+1]: inputs are the first T tokens, targets the last T.

    The model computes the loss without returning logits (`gpt.model.loss.fused_next_token_loss`: the LM head and
    cross-entropy fused, fp32 softmax; labels = the whole window, so all T positions
    are scored, or a LabeledWindows' labels: the mean over its scored positions), adding an MoE load-balancing
    term in training mode; so T may equal max_seq_len.
    """
    inputs, labels = (windows.windows, windows.labels) if isinstance(windows, LabeledWindows) else (windows, windows)
    with precision.autocast():
        _, loss = model(inputs[:, :-1], labels=labels, return_logits=False)
    return loss.float()


def _micro_weights(micro_batches: list[Batch]) -> list[float | torch.Tensor]:
    """What each micro loss is multiplied by so that their sum is the mean over the step: 1/accum for plain
    windows (equal target counts), the micro-batch's share of the scored tokens for labeled ones."""
    if not isinstance(micro_batches[0], LabeledWindows):
        return [1.0 / len(micro_batches)] * len(micro_batches)
    counts = [mb.scored().float() for mb in micro_batches]
    total = torch.stack(counts).sum().clamp(min=1.0)
    return [c / total for c in counts]


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch],
               precision: Precision, grad_clip: float, info: DistInfo = DistInfo(),
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Accumulate gradients over `micro_batches`, clip, and apply one optimizer step unless the loss is non-finite."""
    accum = len(micro_batches)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=micro_batches[0].device)
    weights = _micro_weights(micro_batches)
    for i, windows in enumerate(micro_batches):
        sync = (i == accum - 1) or not is_ddp
        with contextlib.nullcontext() if sync else model.no_sync():
            loss = lm_loss(model, windows, precision)
            # pretraining keeps the division it always had (bit-identical runs); labeled: token-weighted
            loss = loss / accum if not isinstance(windows, LabeledWindows) else loss * weights[i]
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


@torch.no_grad()
def labeled_validation(model: nn.Module, windows: LabeledWindows, precision: Precision, batch_size: int,
                       info: DistInfo = DistInfo()) -> dict[str, float]:
    """Mean loss and greedy next-token accuracy over the scored positions of fixed labeled windows (for SFT: the
    assistant tokens): {"loss", "accuracy", "tokens"}. Ranks split the rows; the sums are all-reduced."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=windows.device)  # nats, correct, scored
    for start in range(info.rank * batch_size, len(windows), batch_size * info.world_size):
        batch = windows[start:start + batch_size]
        with precision.autocast():
            logits, _ = model(batch.windows[:, :-1])
        targets = batch.labels[:, 1:]  # (B, T): the target of each input position
        scored = targets != IGNORE_INDEX
        nats = next_token_loss(logits, batch.labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == targets) & scored
        sums += torch.stack([nats.double(), correct.sum().double(), scored.sum().double()])
    model.train(was_training)
    nats, correct, count = all_reduce_sum(sums, info).tolist()
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "tokens": 0}
    return {"loss": nats / count, "accuracy": correct / count, "tokens": int(count)}
