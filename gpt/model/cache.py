"""Preallocated key/value cache for incremental decoding.

One buffer per layer of shape (B, n_kv_heads, capacity, head_dim) is allocated once per `generate` call and
written in place, so a decode step allocates nothing that grows with the context. Only the KV heads are stored:
with grouped-query attention the cache shrinks by n_heads / n_kv_heads.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for the tokens seen so far (`length` of them, same for the whole batch)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layers, batch_size, n_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0
        # (B, length) bool, True = real token; None while every position is real (no left padding)
        self.key_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at positions [length, length+T); return all keys/values (B, nkv, length+T, hd)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions > capacity {self.capacity}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_tokens: int, new_mask: torch.Tensor | None = None) -> None:
        """Called by the model after all layers have stored the new tokens."""
        if self.key_mask is not None or new_mask is not None:
            old = self.key_mask
            if old is None:
                old = torch.ones(self.batch_size, self.length, dtype=torch.bool, device=self.keys.device)
            if new_mask is None:
                new_mask = torch.ones(self.batch_size, n_tokens, dtype=torch.bool, device=self.keys.device)
            self.key_mask = torch.cat([old, new_mask.bool()], dim=1)
        self.length += n_tokens

    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
