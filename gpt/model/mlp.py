"""Position-wise feed-forward blocks, chosen by `ModelConfig.mlp`: GELU MLP (GPT-2) or SwiGLU (Llama, Qwen3).

Both expose `fc`-like input and `down`-like output projections; the output projection is a residual projection
and gets GPT-2's scaled initialisation (see `DecoderOnlyTransformer._init_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model.config import ModelConfig
from gpt.model.linear import Linear

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


class GeluMLP(nn.Module):
    """d_model → d_ff → activation → d_model (GPT-2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = Linear(config.d_model, config.resolved_d_ff, bias=config.bias)
        self.proj = Linear(config.resolved_d_ff, config.d_model, bias=config.bias)
        self.act = _ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer"); gate and up fused."""

    def __init__(self, config: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or config.resolved_d_ff
        self.gate_up = Linear(config.d_model, 2 * d_ff, bias=config.bias)  # [gate | up] along out
        self.proj = Linear(d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


def build_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.is_moe_layer(layer_idx):
        from gpt.model.moe import MoE

        return MoE(config)
    if config.mlp == "gelu":
        return GeluMLP(config)
    if config.mlp == "swiglu":
        return SwiGLU(config)
    raise ValueError(f"unknown mlp {config.mlp!r}")
