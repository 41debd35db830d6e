"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for the hidden weight matrices; AdamW for the rest.

Idea from Keller Jordan's Muon (modded-nanogpt, 2024; "Muon is scalable for LLM training", Moonshot 2025) and its
use in nanochat: for a 2-D weight W (out, in) the update is the momentum matrix with its singular values pushed
towards 1 — an approximate `U V^T` of its SVD — so every direction of the update moves at the same rate. Five steps
of the quintic iteration X ← aX + (bA + cA²)X with A = X Xᵀ (coefficients a, b, c = 3.4445, −4.7750, 2.0315 as
published) bring the singular values into roughly [0.7, 1.2] rather than exactly 1: the published trade of accuracy
for speed, which training does not mind. The iteration runs in bf16 when the run computes in bf16/fp16 (the
published choice), in fp32 when the run is fp32 (CPU by default): there bf16 rounding of the update would be the
largest error of the step, and a fp32 run on N ranks then equals one process to fp32 round-off (tested).

Which parameters: Muon for the matrices inside the transformer blocks (attention, MLP and router weights; 3-D
expert banks are a batch of matrices); AdamW for embeddings, the LM head, norm gains and biases — they are not hidden linear maps
(embeddings are lookups, the head maps to logits). `split_params` makes that split; each parameter lands in exactly
one group.

One optimizer object holds both kinds of groups (`use_muon` per group), so the checkpoint code that saves and
restores `optimizer.state_dict()` resumes Muon runs exactly, and DDP needs nothing special (gradients are
all-reduced before `step`, so every rank computes the same orthogonalised update). Muon groups keep their own base
learning rate as `lr_multiplier` × the schedule's lr, so one lr schedule (`set_lr`) drives both.

Under FSDP2 (gpt/train/fsdp.py) each rank holds a row shard (a DTensor) of every matrix, its gradient and its
momentum, but the Newton–Schulz iteration needs the whole matrix. So per Muon matrix and step: the momentum update
stays local (elementwise on the shard), the Nesterov direction is all-gathered (`full_tensor()`), every rank
orthogonalises the whole matrix and keeps the rows of its own shard (no communication). Cost per step: one
all-gather of every block matrix (as many bytes as the forward's parameter all-gather, in fp32) and N× redundant
Newton–Schulz compute over N ranks (each rank does all matrices; ~3·5 matmuls of the smaller side² × the larger
side per matrix). Spreading the matrices over the ranks round-robin and scattering the results would remove the
redundancy; not done (correct first, and the iteration is cheap next to the forward/backward at this size).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# after NS_STEPS with the coefficients above, singular values of a full-rank input land in this band (tested)
SINGULAR_VALUE_BAND = (0.5, 1.5)


def orthogonalize(grad: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U Vᵀ of `grad` (..., rows, cols) by the quintic Newton–Schulz iteration; same shape and dtype.

    Each step is three batched matmuls, the polynomial's sums folded into them (baddbmm's beta/alpha): on a CPU
    the iteration over small matrices costs per op, not per FLOP (tiny preset: 1.7-2x faster than separate ops)."""
    a, b, c = NS_COEFFICIENTS
    shape = grad.shape
    x = grad.to(dtype).reshape(-1, *shape[-2:])  # one batch dimension: what baddbmm takes
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: A = X Xᵀ is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1: inside convergence
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        x = torch.baddbmm(x, poly, x, beta=a)  # aX + (bA + cA²)X
    if transposed:
        x = x.mT
    return x.reshape(shape).to(grad.dtype)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full matrix of an FSDP shard (a DTensor: all-gathered); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like the parameter `like`: for a DTensor, this rank's shard of it, cut locally (every rank
    holds the same `full`, so no communication: src_data_rank=None)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _same_shape_batches(directions: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `directions` grouped by shape and dtype, in first-seen order."""
    batches: dict[tuple, list[int]] = {}
    for i, direction in enumerate(directions):
        batches.setdefault((tuple(direction.shape), direction.dtype), []).append(i)
    return list(batches.values())


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(muon, adamw_decay, adamw_no_decay): the ≥2-D weights inside `model.blocks` (the hidden linear maps) /
    other ≥2-D weights (embeddings, LM head) / vectors (norm gains, biases). Decided by where a parameter lives,
    not by its name; shared (tied) tensors appear once."""
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() >= 2}
    muon, decay, no_decay = [], [], []
    for param in model.parameters():  # deduplicates tied tensors
        if not param.requires_grad:
            continue
        if id(param) in hidden:
            muon.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return muon, decay, no_decay


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True`, AdamW for the others, in one optimizer (one state dict to checkpoint).

    Muon group keys: lr_multiplier (its lr = schedule lr × this), momentum, nesterov, weight_decay, ns_steps,
    ns_dtype (the Newton–Schulz iteration's dtype, by name: "bfloat16" or "float32").
    AdamW group keys: betas, eps, weight_decay (decoupled, as torch.optim.AdamW)."""

    def __init__(self, groups: Iterable[dict], lr: float = 1e-3) -> None:
        defaults = dict(lr=lr, use_muon=False, lr_multiplier=1.0, momentum=0.95, nesterov=True, ns_steps=NS_STEPS,
                        ns_dtype="bfloat16",
                        betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices (≥2-D parameters) only")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 — torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr = group["lr"] * group["lr_multiplier"]
        beta = group["momentum"]
        ns_dtype = getattr(torch, group.get("ns_dtype", "bfloat16"))
        params, directions = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)  # buf = beta·buf + (1 − beta)·grad
            params.append(p)
            directions.append(_whole(p.grad.lerp(buf, beta) if group["nesterov"] else buf))
        # matrices of one shape, tall ones transposed (the iteration runs on the wide orientation anyway), are
        # orthogonalised together: one batched iteration instead of one per matrix (on a CPU the small matmuls are
        # dispatch-bound; 16 matrices of the tiny preset: 3 batches)
        tall = [d.size(-2) > d.size(-1) for d in directions]
        wide = [d.mT if t else d for d, t in zip(directions, tall, strict=True)]
        for batch in _same_shape_batches(wide):
            updates = orthogonalize(torch.stack([wide[i] for i in batch]), group["ns_steps"], ns_dtype)
            for i, update in zip(batch, updates, strict=True):
                p = params[i]
                update = _local_part(update.mT if tall[i] else update, p)
                # orthogonal updates of a tall matrix have a smaller RMS per entry; rescale so shape does not change
                # the effective step (max(1, rows/cols)^0.5, as in the reference implementation)
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            if wd:
                p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            denom = (state["exp_avg_sq"].sqrt() / bias2**0.5).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


def build_muon(model: nn.Module, lr: float, muon_lr: float, weight_decay: float, betas: tuple[float, float],
               eps: float, momentum: float = 0.95, muon_weight_decay: float = 0.0, ns_dtype: str = "bfloat16") -> Muon:
    """Muon over the hidden matrices, AdamW (same hyper-parameters as the AdamW optimizer) over the rest."""
    muon, decay, no_decay = split_params(model)
    groups = [
        {"params": muon, "use_muon": True, "lr_multiplier": muon_lr / lr, "momentum": momentum,
         "weight_decay": muon_weight_decay, "ns_dtype": ns_dtype},
        {"params": decay, "use_muon": False, "weight_decay": weight_decay, "betas": betas, "eps": eps},
        {"params": no_decay, "use_muon": False, "weight_decay": 0.0, "betas": betas, "eps": eps},
    ]
    return Muon([g for g in groups if g["params"]], lr=lr)
