"""Preallocated key/value cache for incremental decoding.

One buffer per layer of shape (B, n_kv_heads, capacity, head_dim) is allocated once per `generate` call and
written in place, so a decode step allocates nothing that grows with the context. Only the KV heads are stored:
with grouped-query attention the cache shrinks by n_heads / n_kv_heads. `BatchKVCache` holds sequences of
different lengths side by side, for a server that batches requests as they come (continuous batching).
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

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
        """An empty cache whose buffers are the given (n_layers, B, n_kv_heads, capacity, head_dim) tensors (views
        allowed: writes go into them)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.capacity = keys, values, keys.shape[3]
        cache.length, cache.key_mask = 0, None
        return cache

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


class BatchKVCache:
    """Keys and values for a fixed number of *slots*, each holding one sequence of its own length.

    Built for continuous batching (gpt/serve/batch.py): sequences join and leave between decode steps, so each
    row has its own length, hence its own positions and its own attention range. A step over B sequences uses
    rows 0..B-1 (the caller keeps live sequences in the leading rows, `move` compacts), so the keys each layer
    attends to are a view, never a gather:

      row(i)        a KVCache over slot i alone (batch 1): prefill a newcomer straight into its slot with the
                    ordinary one-sequence forward, or decode a lone sequence exactly as `generate` does
      begin(B, T)   before a forward of T new tokens on rows 0..B-1: their positions (B, T) and the attention
                    mask (B, 1, T, S) that lets each row see only its own cached tokens and the new ones
      update/advance  what the model calls per layer / after all layers, as with KVCache
    """

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layers, slots, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.lengths = [0] * slots  # cached tokens per slot
        self.key_mask = None  # (the model's padding mechanism is not used: `begin` builds the mask)
        self._rows = 0  # rows of the forward in progress, set by `begin`
        self._write_pos: torch.Tensor | None = None  # (B, T) cache positions of the new tokens
        self._span = 0  # keys attended to: the longest row after the new tokens

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    def row(self, i: int) -> KVCache:
        """A batch-1 KVCache over slot i, starting at the slot's current length; give its length back with
        `set_length(i, view.length)` after using it."""
        view = KVCache.over(self.keys[:, i:i + 1], self.values[:, i:i + 1])
        view.length = self.lengths[i]
        return view

    def set_length(self, i: int, length: int) -> None:
        if not 0 <= length <= self.capacity:
            raise ValueError(f"slot length {length} outside 0..{self.capacity}")
        self.lengths[i] = length

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src`'s cached tokens into slot `dst` (which is overwritten) and give it src's length."""
        n = self.lengths[src]
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.lengths[dst] = n

    def begin(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a forward of T new tokens on rows 0..B-1 → (positions (B, T), attention mask (B, 1, T, S))."""
        if B > self.slots:
            raise ValueError(f"{B} rows but only {self.slots} slots")
        lengths = self.lengths[:B]
        if max(lengths) + T > self.capacity:
            raise RuntimeError(f"KV cache full: {max(lengths) + T} positions > capacity {self.capacity}")
        device = self.keys.device
        self._rows, self._span = B, max(lengths) + T
        positions = torch.tensor(lengths, device=device).unsqueeze(1) + torch.arange(T, device=device)  # (B, T)
        self._write_pos = positions
        key_pos = torch.arange(self._span, device=device)
        mask = key_pos.view(1, 1, -1) <= positions.unsqueeze(-1)  # (B, T, S): own cached tokens, causal new ones
        return positions, mask.unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at each row's own positions; return rows 0..B-1 (B, nkv, S, hd)."""
        B, pos = k.shape[0], self._write_pos
        if pos is None or B != self._rows:
            raise RuntimeError("BatchKVCache.update before begin(B, T) for this batch")
        rows = torch.arange(B, device=k.device).unsqueeze(1)  # (B, 1)
        self.keys[layer][rows, :, pos] = k.transpose(1, 2)  # indexed view: (B, T, nkv, hd)
        self.values[layer][rows, :, pos] = v.transpose(1, 2)
        return self.keys[layer, :B, :, : self._span], self.values[layer, :B, :, : self._span]

    def advance(self, n_tokens: int, new_mask: torch.Tensor | None = None) -> None:
        """Called by the model after all layers have stored the new tokens."""
        for i in range(self._rows):
            self.lengths[i] += n_tokens
        self._write_pos = None

    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
