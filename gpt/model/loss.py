"""Next-token cross-entropy: the one place the language-modelling loss is computed.

The model (`forward(input_ids, labels=...)`), the training step and evaluation all call `next_token_loss`, so the
shift, the fp32 upcast and the ignore value are written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label that is not scored (padding, prompt tokens); the value Hugging Face uses


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the next tokens: position t is scored against labels[:, t + 1].

    labels is the token sequence itself, (B, T) — the last position has nothing to predict — or one token
    longer, (B, T + 1), so that every position is scored (a training window of T + 1 tokens, of which the model
    sees the first T). Labels equal to IGNORE_INDEX are not scored. Computed in float32 whatever the logits'
    dtype; `reduction` as in `F.cross_entropy` ("mean" over scored positions, or "sum").
    """
    T = logits.shape[1]
    if labels.shape[0] != logits.shape[0] or labels.shape[1] not in (T, T + 1):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)}: "
                         "expected (B, T) or (B, T + 1)")
    targets = labels[:, 1:]  # (B, T - 1) or (B, T)
    logits = logits[:, :targets.shape[1]]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
