"""Dense position-wise feed-forward blocks, chosen by `ModelConfig.mlp`: GELU MLP (GPT-2) or SwiGLU (Llama, Qwen3).

Both have an input projection and an output projection `proj`; `proj` writes into the residual stream, so
`init_weights` gives it GPT-2's scaled standard deviation. The Mixture-of-Experts block is in moe.py (it uses
`SwiGLU` for its shared expert); `DecoderOnlyTransformer` picks between them per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model.config import ModelConfig

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


def init_linear(linear: nn.Linear, std: float) -> None:
    """GPT-2's initialisation of a projection: normal(0, std) weight, zero bias."""
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class GeluMLP(nn.Module):
    """d_model → d_ff → activation → d_model (GPT-2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.resolved_d_ff, bias=config.bias)
        self.proj = nn.Linear(config.resolved_d_ff, config.d_model, bias=config.bias)
        self.act = _ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.fc, std)
        init_linear(self.proj, residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer"); gate and up fused."""

    def __init__(self, config: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or config.resolved_d_ff
        self.gate_up = nn.Linear(config.d_model, 2 * d_ff, bias=config.bias)  # [gate | up] along out
        self.proj = nn.Linear(d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.gate_up, std)
        init_linear(self.proj, residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


def build_dense_mlp(config: ModelConfig) -> nn.Module:
    if config.mlp == "gelu":
        return GeluMLP(config)
    if config.mlp == "swiglu":
        return SwiGLU(config)
    raise ValueError(f"unknown mlp {config.mlp!r}")
