"""`Linear`: `nn.Linear` with a faster path for batch-1 decoding on CPU.

Decoding one token at a time is memory-bound: every step reads every weight once. On this kind of CPU
`F.linear` reads an (out, in) fp32 weight for a single row at roughly half the speed of a plain matmul against
the same weight stored transposed (in, out) and contiguous, and bf16 `F.linear` is faster still when the
weight is pre-packed for oneDNN (measured in bench/README.md). So for small-row inference calls on CPU (no
autograd, at most `DECODE_MAX_ROWS` rows) the layer keeps a weight copy in the fast layout, rebuilt whenever
the weight changes (new storage, in-place update, dtype change). Training, batched evaluation and GPUs use
`F.linear` untouched. The price is a second copy of the weights in memory while decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODE_MAX_ROWS = 4


def _mkldnn_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._decode_key: tuple | None = None
        self._decode_fn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() > DECODE_MAX_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return self._decode_kernel()(x)

    def _weight_key(self) -> tuple:
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter
            version = None
        return (w.data_ptr(), version, w.dtype, None if self.bias is None else self.bias.data_ptr())

    def _decode_kernel(self):
        key = self._weight_key()
        if key != self._decode_key:
            self._decode_fn, self._decode_key = None, None  # free the old copy before making the new one
            self._decode_fn, self._decode_key = self._build_decode_kernel(), key
        return self._decode_fn

    def _build_decode_kernel(self):
        weight = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        if weight.dtype == torch.bfloat16 and _mkldnn_bf16():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # oneDNN layout for batch-1 GEMV
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if weight.dtype == torch.float32:
            weight_t = weight.t().contiguous()  # (in, out)
            if bias is None:
                return lambda x: x @ weight_t
            return lambda x: torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight_t).view(*x.shape[:-1], -1)
        return lambda x: F.linear(x, weight, bias)
