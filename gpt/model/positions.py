"""Position encodings, chosen by `ModelConfig.position`.

Both classes offer the same hooks so the model never branches on the kind (and `init_weights(std)`):
`embed(x, positions)` adds absolute embeddings to the token embeddings (learned) or does nothing (RoPE), and
`rotate(q, k, positions)` rotates queries and keys inside attention (RoPE) or does nothing (learned).
`positions` are absolute token positions, shape (T,) or (B, T) — with a KV cache they continue from the cache.
"""

from __future__ import annotations

import torch
from torch import nn


class LearnedPositions(nn.Module):
    """GPT-2: a learned vector per absolute position, added to the token embedding."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.wpe = nn.Embedding(max_seq_len, d_model)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.wpe.weight, mean=0.0, std=std)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.wpe(positions)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class RotaryPositions(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer), in the "rotate half" layout of Llama/Qwen3 in HF.

    Channel i is paired with channel i + head_dim/2 and the pair is rotated by angle pos * theta^(-2i/head_dim),
    so q·k depends only on the relative position. cos/sin tables are precomputed for max_seq_len positions
    (non-persistent buffers: not part of checkpoints).
    """

    def __init__(self, max_seq_len: int, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def init_weights(self, std: float) -> None:
        """Nothing to learn: the tables are fixed."""

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (B, nh, T, hd), k: (B, nkv, T, hd); positions (T,) -> tables (T, hd), (B, T) -> (B, 1, T, hd)
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def build_positions(config) -> nn.Module:
    if config.position == "learned":
        return LearnedPositions(config.max_seq_len, config.d_model)
    if config.position == "rope":
        return RotaryPositions(config.max_seq_len, config.resolved_head_dim, config.rope_theta)
    raise ValueError(f"unknown position encoding {config.position!r}")
