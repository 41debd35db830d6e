"""Causal self-attention with grouped-query heads, optional QK-norm and a KV cache.

One class covers multi-head (GPT-2), grouped-query and multi-query attention: `n_kv_heads` key/value heads are
shared by groups of query heads (Ainslie et al. 2023, GQA). Queries, keys and values come from one fused
projection (one matmul instead of three). Position information enters through `positions.rotate` (RoPE) or not
at all (learned positions are added to the embeddings). The kernel is `F.scaled_dot_product_attention`
(Flash/memory-efficient kernels on GPU).

One measured exception: PyTorch's CPU flash kernel is slow *backward* in bf16 for short sequences with narrow
heads (fwd+bwd of the tiny preset's 16 x 4 heads x 128 x 32: 16.8 ms in bf16, 9.4 ms through fp32 including the
casts; 5x at 8 heads of 16). So CPU training under bf16 autocast runs attention in fp32 while keys x head_dim is
below FP32_ATTENTION_BELOW (the measured crossover: bf16 wins from 256 x 64 and 512 x 32 up). Inference (no
gradient) keeps bf16, whose forward is the faster one everywhere.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model.cache import KVCache
from gpt.model.config import ModelConfig
from gpt.model.norms import RMSNorm

FP32_ATTENTION_BELOW = 16384  # keys x head_dim; see the module docstring


def _fp32_is_faster(q: torch.Tensor, keys: int) -> bool:
    """CPU training whose attention would run in bf16 — bf16 inputs, or float32 ones that autocast would cast (the
    RMSNorm'd queries and keys of QK-norm blocks are float32) — over few keys × narrow heads."""
    if q.device.type != "cpu" or not torch.is_grad_enabled() or keys * q.shape[-1] >= FP32_ATTENTION_BELOW:
        return False
    return q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.resolved_head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.bias)  # [q | k | v] along out
        self.out = nn.Linear(q_dim, config.d_model, bias=config.bias)
        # Qwen3: RMSNorm over each head's channels of q and k, before RoPE, keeps attention logits bounded
        self.q_norm = RMSNorm(self.head_dim, config.layer_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.layer_norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def init_weights(self, std: float, residual_std: float) -> None:
        """GPT-2 scheme: normal(std) weights, zero biases; `out` writes into the residual stream (residual_std)."""
        for linear, linear_std in ((self.qkv, std), (self.out, residual_std)):
            nn.init.normal_(linear.weight, mean=0.0, std=linear_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        for norm in (self.q_norm, self.k_norm):
            if isinstance(norm, RMSNorm):
                norm.init_weights()

    def forward(self, x: torch.Tensor, positions_module: nn.Module, positions: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = self.q_norm(q.view(B, T, self.n_heads, hd)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv_heads, hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = positions_module.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd), S = cached + T
            if q.dtype != k.dtype:  # the cache may be kept in higher precision than the model (see new_cache)
                q = q.to(k.dtype)
        fp32 = _fp32_is_faster(q, k.shape[-2])
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * hd)
        if y.dtype != x.dtype:  # a bf16 model with a float32 cache (or fp32 attention in a bf16 model)
            y = y.to(x.dtype)
        return self.resid_dropout(self.out(y))


def build_attention_mask(T: int, past: int, key_padding: torch.Tensor | None,
                         device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """Mask for T new queries after `past` cached tokens → (bool mask broadcastable to (B, 1, T, S), is_causal).

    `key_padding` (B, S) is True for real tokens. The common cases avoid building a mask: a fresh causal
    sequence uses the kernel's `is_causal`, a single new token sees every cached key.
    """
    if key_padding is None:
        if T == 1:
            return None, False
        if past == 0:
            return None, True
    S = past + T
    query_pos = torch.arange(past, S, device=device).unsqueeze(1)  # (T, 1)
    key_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    mask = key_pos <= query_pos  # (T, S) causal with the cache offset
    if key_padding is None:
        return mask, False
    mask = mask.unsqueeze(0) & key_padding[:, None, :].bool()  # (B, T, S)
    # A padding query sees no real key; let it see itself so softmax stays finite (its output is never used).
    mask = mask | (key_pos == query_pos).unsqueeze(0)
    return mask.unsqueeze(1), False  # (B, 1, T, S)
