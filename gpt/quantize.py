"""INT8 weights for CPU inference: the tensor and module code (no files; gpt.model_dir writes and reads the
quantized copies of a model directory, `gpt quantize` → `model_dir.save_quantized`).

INT8: every `nn.Linear` (attention, MLP, LM head) and the token embedding get per-output-channel symmetric INT8
weights, `w ≈ int8 * scale[out]`, scale = max|w_row| / 127. `int8_state_dict` gives the tensors to store: plain
int8 and float32 tensors (no quantized tensor types, no pickle); norms, biases and position tables stay float32.
`build_int8_model` turns them back into a model: the embedding is dequantized (a lookup is cheap) and each Linear
becomes an `Int8Linear`.

Why this design and which kernel. Batch-1 decoding on a CPU is memory-bound (every token reads every weight),
so storing a quarter of the bytes is what makes it faster. torch 2.13 still ships the fbgemm dynamic-quantized
linear (`torch.ops.quantized.linear_dynamic`: activations quantized to uint8 on the fly, int8 weights) and it
is the fastest INT8 matmul measured here (bench/README.md), but `torch.ao.quantization` and the quantized tensor
types are deprecated (slated for removal; the successor is torchao, which would be one more pinned dependency
whose CPU path wants torch.compile). So the *file format* doesn't depend on them: `Int8Linear` packs the stored
int8 weights for fbgemm when that backend exists, and otherwise falls back to the maintained core op
`torch.ops.aten._weight_int8pack_mm` (weight-only INT8 with bf16 activations), with the same numbers on disk.

bf16 / fp16 copies are just the weights cast (`DTYPES`), saved and loaded by gpt.model_dir in that dtype.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt.errors import GptError
from gpt.model import DecoderOnlyTransformer, ModelConfig

DTYPES = {"int8": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: per-channel INT8 (Int8Linear)
KERNELS = ("fbgemm", "int8pack")


class QuantizeError(GptError, ValueError):
    """Bad quantization request or an unreadable quantized directory (the message names the file or value)."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float → (int8 (out, in), float32 scale (out,)) with weight ≈ int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8Linear(nn.Module):
    """A Linear layer with INT8 weights (per output channel scales); input and output stay float."""

    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q_weight.shape
        self.register_buffer("q_weight", q_weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.num_weight_elements = q_weight.numel()
        self.kernel = kernel or ("fbgemm" if _fbgemm_available() else "int8pack")
        if self.kernel not in KERNELS:
            raise QuantizeError(f"kernel: {self.kernel!r} is not one of {KERNELS}")
        self._packed = self._prepack() if self.kernel == "fbgemm" else None
        self._scale_bf16 = self.scale.to(torch.bfloat16)

    def _prepack(self) -> Any:
        with warnings.catch_warnings():  # the quantized tensor type is deprecated; it only lives inside the pack
            warnings.simplefilter("ignore")
            zero = torch.zeros(self.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.q_weight, self.scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qw, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
            # the common decode call: fbgemm takes (..., in) as is — one op instead of five (~25 calls per token)
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._packed is not None and x2.device.type == "cpu":
            # reduce_range: 7-bit activations avoid int16 accumulation overflow on CPUs without VNNI (fbgemm)
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._packed, True)
        elif x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.q_weight,
                                                   self._scale_bf16).float()
            if self.bias is not None:
                y = y + self.bias
        else:  # other devices: dequantize on the fly (correct, not fast)
            y = F.linear(x2.float(), dequantize(self.q_weight, self.scale).to(x2.device), self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def int8_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors to store for an INT8 copy and the names of the quantized ones: each quantized `name` becomes
    int8 `name` + float32 `name_scale` (Linear weights and the embedding); everything else float32 as is."""
    tied = bool(getattr(model.config, "tie_embeddings", False))
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    quantized = [f"{n}.weight" for n in _linear_names(model)] + ["tok_embeddings.weight"]
    if tied:
        quantized.remove("lm_head.weight")  # the same tensor as the embedding: stored once
        state.pop("lm_head.weight", None)
    for key in quantized:
        q, scale = quantize_per_channel(state[key])
        state[key], state[key + "_scale"] = q, scale
    return state, quantized


def build_int8_model(config: ModelConfig, state: dict[str, torch.Tensor], quantized: list[str],
                     kernel: str | None = None) -> DecoderOnlyTransformer:
    """The model for `int8_state_dict`'s tensors: Linear layers swapped for `Int8Linear`, the embedding
    dequantized (eval mode, CPU). Raises QuantizeError naming the tensors that are missing or unexpected."""
    model = DecoderOnlyTransformer(config)
    missing = [k for k in quantized if k not in state or k + "_scale" not in state]
    if missing:
        raise QuantizeError(f"missing quantized tensors {missing[:5]}")
    plain = {k: v for k, v in state.items() if k not in set(quantized) and not k.endswith("_scale")}
    plain["tok_embeddings.weight"] = dequantize(state["tok_embeddings.weight"], state["tok_embeddings.weight_scale"])
    if config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie before replacing
    result = model.load_state_dict(plain, strict=False)
    linear_weights = {f"{n}.weight" for n in _linear_names(model)}
    missing_plain = [k for k in result.missing_keys if k not in linear_weights]
    if missing_plain or result.unexpected_keys:
        raise QuantizeError(f"tensors do not match the config: missing {missing_plain[:5]}, "
                            f"unexpected {result.unexpected_keys[:5]}")
    for name in _linear_names(model):
        key = "tok_embeddings.weight" if name == "lm_head" and config.tie_embeddings else f"{name}.weight"
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(state[key], state[key + "_scale"], state.get(f"{name}.bias"), kernel))
    return model.eval()
