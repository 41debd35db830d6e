"""Next-token cross-entropy: the one place the language-modelling loss is computed.

The model (`forward(input_ids, labels=...)`), the training step and evaluation all call `next_token_loss`, so the
shift, the fp32 upcast and the ignore value are written once.

Training, which needs the loss but not the logits, calls `fused_next_token_loss` instead (through
`model(..., labels=..., return_logits=False)`): the LM head and the cross-entropy in one autograd function over
row chunks, with the gradient of each chunk's logits formed in the forward pass (softmax − one-hot, the idea of
Liger-Kernel's fused linear cross-entropy) and folded straight into the gradients of the hidden states and the head
weight. The (rows × vocabulary) fp32 logits, their log-softmax and its gradient are never materialised whole —
on the tiny preset at batch 32 × 128 those passes (log-softmax forward and backward, the zero-fill of the gradient,
the casts) were 38% of a CPU training step. Same logits (the head runs in the autocast dtype, as the unfused
path), the same loss to fp32 round-off. With bf16 logits on a CPU, the per-chunk softmax, loss and gradient are
one native pass per row, in place (`gpt.kernels.softmax_xent`; the ATen ops elsewhere and under torch.compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt import kernels

IGNORE_INDEX = -100  # a label that is not scored (padding, prompt tokens); the value Hugging Face uses
# fused loss: rows per chunk × vocabulary (32 MB of fp32 logits), but at least MIN_CHUNK_ROWS rows: every chunk adds
# its (vocab × width) head gradient into the fp32 total, traffic that smaller chunks of a large vocabulary do not
# amortise (seed config, 65,536 vocab: 128-row chunks made a bf16 CPU step 1.3x slower than the unfused loss)
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK_ROWS = 1024


def _next_tokens(labels: torch.Tensor, scores: torch.Tensor, what: str) -> torch.Tensor:
    """labels (B, T) or (B, T + 1) for `scores` (B, T, ·) → the targets labels[:, 1:], (B, T - 1) or (B, T)."""
    B, T = scores.shape[:2]
    if labels.shape[0] != B or labels.shape[1] not in (T, T + 1):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit {what} of shape {tuple(scores.shape)}: "
                         "expected (B, T) or (B, T + 1)")
    return labels[:, 1:]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the next tokens: position t is scored against labels[:, t + 1].

    labels is the token sequence itself, (B, T) — the last position has nothing to predict — or one token
    longer, (B, T + 1), so that every position is scored (a training window of T + 1 tokens, of which the model
    sees the first T). Labels equal to IGNORE_INDEX are not scored. Computed in float32 whatever the logits'
    dtype; `reduction` as in `F.cross_entropy` ("mean" over scored positions, or "sum").
    """
    targets = _next_tokens(labels, logits, "logits")
    logits = logits[:, :targets.shape[1]]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum over scored rows of CE(hidden @ weightᵀ, targets) / their count; the head in `dtype`; gradients are
    computed chunk by chunk in forward (training always runs backward next) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        scored = targets != IGNORE_INDEX
        count = scored.sum().clamp(min=1)
        w = weight.to(dtype)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wants_grad = want_hidden or want_weight
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows].to(dtype), targets[start:start + rows]
            keep = scored[start:start + rows]
            # the head in `dtype` (bf16 under autocast, as nn.Linear); CE = −log p[target], and the logits' gradient
            # is p − one-hot (× 1/count, applied to the small results)
            logits = h @ w.T
            nll = None if torch.compiler.is_compiling() else kernels.softmax_xent(logits, t)
            if nll is not None:  # bf16 on a CPU with the native kernel: in place, one pass per row
                total += (nll * keep).sum()
                grad = logits
            else:  # one fused softmax kernel into fp32, the one-hot subtracted there, then cast once
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                safe = t.clamp(min=0).unsqueeze(1)
                picked = probs.gather(1, safe).squeeze(1).clamp_(min=torch.finfo(torch.float32).tiny)  # ≤ 87.3 nats
                total -= (picked.log() * keep).sum()
                if wants_grad:
                    probs.scatter_add_(1, safe, torch.full(safe.shape, -1.0, device=probs.device))
                    grad = probs.to(dtype)
            if not wants_grad:
                continue
            # unscored rows get no gradient: masked on the narrow side (rows × width, not rows × vocabulary) and
            # without a data-dependent branch (no host sync on a GPU, no graph break under torch.compile)
            mask = keep.unsqueeze(1).to(dtype)
            if want_hidden:
                grad_hidden[start:start + rows] = (grad @ w) * mask
            if want_weight:
                chunk_grad = (grad.T @ (h * mask)).float()
                grad_weight = chunk_grad if grad_weight is None else grad_weight.add_(chunk_grad)
        scale = 1.0 / count.float()
        if grad_hidden is not None:
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_output.float()
        return (None if grad_hidden is None else grad_hidden * g.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * g).to(ctx.weight_dtype), None, None)


def fused_next_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """next_token_loss(hidden @ weightᵀ, labels) (the mean) without the logits tensor: hidden (B, T, C), weight
    (V, C). Under autocast the head runs in the autocast dtype (as nn.Linear would); gradients come back in each
    input's dtype. For training, where the logits are not needed; `next_token_loss` otherwise."""
    targets = _next_tokens(labels, hidden, "hidden states")
    hidden = hidden[:, :targets.shape[1]]
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                              dtype)
