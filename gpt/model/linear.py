"""`Linear`: `nn.Linear` with a faster path for batch-1 decoding on CPU.

Decoding one token at a time is memory-bound: every step reads every weight once, one row of activations
against the whole weight (a GEMV). Measured on this CPU (AMD EPYC with AVX-512 bf16, torch 2.13), per decode step
of the seed model at 1 thread (bench/README.md):
  - fp32: `F.linear` reads the (out, in) weight at ~6 GB/s; a plain matmul against a transposed, contiguous
    (in, out) copy reads it at ~11 GB/s (also noted in ../shared/RESOURCES.md): +25% tokens/s end to end.
  - bf16: `F.linear` goes through oneDNN, which reorders the weight on every call (~4.7 GB/s, and ~6.9 GB/s
    even with a pre-packed weight); with oneDNN switched off for the call, ATen's own bf16 GEMV reads the
    weight as it is at ~10.7 GB/s: +22% tokens/s over the pre-packed oneDNN weight, with no extra copy.
So for small-row inference calls on CPU (no autograd, at most `DECODE_MAX_ROWS` rows) the layer uses those
kernels; an fp32 layer keeps its transposed copy (rebuilt when the weight changes: new storage, in-place update,
dtype change). Training, batched evaluation and GPUs use `F.linear` untouched. Costs: an fp32 model holds a
second copy of its weights while decoding; the bf16 path flips the process-wide oneDNN switch for the duration
of one matmul (another thread's oneDNN call at that instant would merely take the slower path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODE_MAX_ROWS = 4


def _linear_without_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.mkldnn.enabled = previous


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
        if weight.dtype == torch.bfloat16:
            return lambda x: _linear_without_onednn(x, weight, bias)
        if weight.dtype == torch.float32:
            weight_t = weight.t().contiguous()  # (in, out)
            if bias is None:
                return lambda x: x @ weight_t
            return lambda x: torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight_t).view(*x.shape[:-1], -1)
        return lambda x: F.linear(x, weight, bias)
