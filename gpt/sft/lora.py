"""LoRA: low-rank adapters on the attention and MLP projections, applied from outside the model.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight W (out, in) gets a trainable
update scaling * B @ A with A (rank, in), B (out, rank) and scaling = alpha / rank, so

    y = x W^T + b + scaling * dropout(x) A^T B^T

B starts at zero (the adapted model is exactly the base model at step 0) and A like nn.Linear's weight (the
reference implementation and PEFT do the same). Only A and B are trained: the optimizer holds 2 * rank * (in + out)
numbers per adapted layer instead of in * out, and AdamW's state is that size too.

The model stays plain: `apply_lora` swaps chosen `nn.Linear` modules inside `model.blocks` for `LoRALinear` (which
shares the base parameters, the way gpt/inference.py swaps in DecodeLinear) and freezes everything else;
`merge_lora` swaps them back for `nn.Linear` modules holding W + scaling * B @ A, so a merged model is an ordinary
model every consumer loads. The adapters alone are saved with `save_adapter` (safetensors: `<layer>.lora_A`,
`<layer>.lora_B`, and the LoRA config as JSON in the header) and put back on a base model with `load_adapter`.

Targets: `attention` (every Linear under a block's `attn`), `mlp` (every Linear under a block's `mlp`, except an
MoE router), or a layer's own name (`qkv`, `out`, `fc`, `proj`, `gate_up`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gpt.atomic import write_atomic
from gpt.config import ConfigError

ADAPTER_FILE = "adapter.safetensors"  # beside the merged weights in a LoRA chat model directory
ADAPTER_FORMAT = "gpt-pipeline-lora"
GROUPS = {"attention": "attn", "mlp": "mlp"}  # target group → the block attribute it covers


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """params.yaml `sft.lora:`. rank 0 or null = full fine-tuning (no adapters)."""

    rank: int | None = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["attention", "mlp"])

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 0:
            raise ConfigError(f"sft.lora.rank: must be >= 0 (0 or null = full fine-tuning), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"sft.lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sft.lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("sft.lora.targets: name at least one of attention, mlp or a layer name (qkv, ...)")

    @property
    def enabled(self) -> bool:
        return bool(self.rank)


class LoRALinear(nn.Linear):
    """An `nn.Linear` (the frozen base, parameters shared with the layer it replaced) plus a rank-r update."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias  # shared, not copied
        device, dtype = linear.weight.device, linear.weight.dtype
        layer.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # nn.Linear's own weight init
        layer.rank, layer.alpha, layer.scaling = rank, alpha, alpha / rank
        layer.lora_dropout = nn.Dropout(dropout)
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) via (..., rank)
        return base + self.scaling * update

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + scaling * B @ A (in float32, then the base dtype)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
            merged.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        merged.train(self.training)
        return merged


def _target_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """Qualified names of the nn.Linear layers the targets cover (router layers never)."""
    names, used = [], set()
    for block_index, block in enumerate(model.blocks):
        for name, module in block.named_modules():
            if type(module) is not nn.Linear or name.endswith("router"):
                continue
            top, leaf = name.split(".")[0], name.rsplit(".", 1)[-1]
            hit = [t for t in targets if GROUPS.get(t) == top or t == leaf]
            if hit:
                names.append(f"blocks.{block_index}.{name}")
                used.update(hit)
    unknown = [t for t in targets if t not in used]
    if unknown:
        raise ConfigError(f"sft.lora.targets: {unknown} match no layer of this model; use attention, mlp or a "
                          "Linear layer's name inside a block (qkv, out, fc, proj, gate_up)")
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze `model` and swap the targeted Linear layers for LoRALinear (in place); returns their names."""
    if not cfg.enabled:
        raise ValueError("apply_lora needs sft.lora.rank >= 1")
    names = _target_layers(model, cfg.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear (in place); the model is then a plain one. Returns it."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.merged_linear())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": getattr(layer, part).detach().contiguous()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def save_adapter(state: dict[str, torch.Tensor], path: str | Path, cfg: LoraConfig) -> Path:
    """Write adapters (`adapter_state_dict(model)`, taken before merging) to a safetensors file, atomically, with the
    LoRA config in its header."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    header = {"lora": json.dumps({"format": ADAPTER_FORMAT, **dataclasses.asdict(cfg)}, sort_keys=True)}
    return write_atomic(Path(path), lambda tmp: save_file(state, tmp, metadata=header))


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter file written by `save_adapter`."""
    with safe_open(str(path), framework="pt") as f:
        meta: dict[str, Any] = json.loads((f.metadata() or {}).get("lora", "{}"))
        if meta.pop("format", None) != ADAPTER_FORMAT:
            raise ConfigError(f"{path}: not a {ADAPTER_FORMAT} adapter file")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return LoraConfig(**meta), tensors


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the adapters in `path` on base model `model` (unmerged, frozen base). Returns the model."""
    cfg, tensors = read_adapter(path)
    apply_lora(model, cfg)
    missing = set(adapter_state_dict(model)) ^ set(tensors)
    if missing:
        raise ConfigError(f"{path}: adapters do not fit this model ({sorted(missing)[:4]} ...)")
    model.load_state_dict(tensors, strict=False)
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable", "total"} parameter counts (shared tensors once)."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (AdamW: the two moments of every trained parameter)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))
