"""Conversations → fixed training windows for SFT: render, label, pack best-fit, serve batches by step.

Each conversation is rendered by `gpt.chat.ChatTemplate` into ids and a loss mask; its labels are the ids where the
mask is 1 (assistant content and its `<|end|>`) and -100 elsewhere, so the loss (`gpt.model.loss.next_token_loss`)
scores only what the assistant says. Windows hold `seq_len + 1` tokens, like pretraining windows: the model reads
the first seq_len, and labels[:, t + 1] is the target of position t.

Packing: best-fit decreasing (the bin-packing heuristic; longest conversations first, each into the window whose
free space it fills most tightly, a new window when none has room). A conversation is never cut when it fits in a
window; one longer than the window is cropped to its first seq_len + 1 tokens, and the cropped tokens are counted
(`PackStats.cropped_fraction`). A window whose conversation kept no assistant token after cropping is dropped and
counted. The rest of a window is padding (label -100). Conversations in one window attend to the earlier ones, as
pretraining documents do across EOS; each starts with EOS, the token a document starts after in pretraining.

`PackedConversations` is a training-loop batch source (gpt.train.loop.BatchSource): the windows of step s are a
pure function of (seed, s) — a fresh permutation per epoch — so a resumed SFT run sees the same data.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from gpt.chat import ChatTemplate
from gpt.model.loss import IGNORE_INDEX
from gpt.train.step import LabeledWindows


@dataclasses.dataclass
class PackStats:
    conversations: int = 0
    windows: int = 0
    tokens: int = 0  # rendered tokens of all conversations
    assistant_tokens: int = 0  # scored tokens kept in windows
    cropped_conversations: int = 0
    cropped_tokens: int = 0
    dropped_conversations: int = 0  # nothing left to score after cropping
    padding_tokens: int = 0

    @property
    def cropped_fraction(self) -> float:
        return self.cropped_tokens / self.tokens if self.tokens else 0.0

    @property
    def fill(self) -> float:
        """Fraction of window tokens that are conversation tokens (not padding)."""
        total = self.tokens - self.cropped_tokens + self.padding_tokens
        return 1.0 - self.padding_tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cropped_fraction": self.cropped_fraction, "fill": self.fill}


def render_labeled(template: ChatTemplate, messages: Iterable[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: labels = ids on assistant tokens, -100 elsewhere."""
    ids, mask = template.render(messages)
    return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=True)]


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` (each <= capacity) grouped into bins of at most `capacity`.
    Deterministic: ties broken by index; bins in order of creation."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))  # the tightest bin with room
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], b))
    return bins


def pack_conversations(conversations: Iterable[Mapping[str, Any]], template: ChatTemplate, seq_len: int,
                       pad_id: int) -> tuple[np.ndarray, np.ndarray, PackStats]:
    """Rows of `{"messages": [...]}` → (windows [N, seq_len + 1], labels [N, seq_len + 1], stats)."""
    width = seq_len + 1
    stats = PackStats()
    sequences: list[tuple[list[int], list[int]]] = []
    for row in conversations:
        ids, labels = render_labeled(template, row["messages"])
        stats.conversations += 1
        stats.tokens += len(ids)
        if len(ids) > width:
            stats.cropped_conversations += 1
            stats.cropped_tokens += len(ids) - width
            ids, labels = ids[:width], labels[:width]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped_conversations += 1
            continue
        sequences.append((ids, labels))
    bins = best_fit([len(ids) for ids, _ in sequences], width)
    windows = np.full((len(bins), width), pad_id, dtype=np.int64)
    labels = np.full((len(bins), width), IGNORE_INDEX, dtype=np.int64)
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            ids, labs = sequences[i]
            windows[row, at:at + len(ids)] = ids
            labels[row, at:at + len(ids)] = labs
            at += len(ids)
        stats.padding_tokens += width - at
    stats.windows = len(bins)
    stats.assistant_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return windows, labels, stats


def pad_conversations(conversations: Iterable[Mapping[str, Any]], template: ChatTemplate,
                      pad_id: int) -> LabeledWindows:
    """One conversation per row, padded to the longest (evaluation: no conversation sees another)."""
    rendered = [render_labeled(template, row["messages"]) for row in conversations]
    width = max(len(ids) for ids, _ in rendered)
    windows = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rendered), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(rendered):
        windows[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(labs)
    return LabeledWindows(windows, labels)


class PackedConversations:
    """Packed SFT windows as a training-loop batch source (same interface as gpt.data.shards.TokenShards)."""

    def __init__(self, windows: np.ndarray, labels: np.ndarray, stats: PackStats | None = None) -> None:
        if len(windows) == 0:
            raise ValueError("no SFT windows to train on (every conversation was empty or dropped)")
        self.windows, self.labels, self.stats = torch.from_numpy(windows), torch.from_numpy(labels), stats
        self.seq_len = windows.shape[1] - 1
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def _check(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise ValueError(f"windows were packed for seq_len {self.seq_len}, asked for {seq_len}")

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) not in self._orders:
            if len(self._orders) > 4:  # a batch spans at most two epochs: keep only a few orders
                self._orders.clear()
            self._orders[(seed, epoch)] = np.random.default_rng([seed, epoch]).permutation(len(self))
        return self._orders[(seed, epoch)]

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> LabeledWindows:
        """This rank's windows of `step`: global positions step*B*W ... of an endless sequence of epochs, each a
        permutation drawn from (seed, epoch); rank r takes the r-th slice of the global batch."""
        self._check(seq_len)
        first = (step * world_size + rank) * batch_size
        rows = []
        for g in range(first, first + batch_size):
            epoch, pos = divmod(g, len(self))
            rows.append(int(self._order(seed, epoch)[pos]))
        index = torch.tensor(rows)
        return LabeledWindows(self.windows[index], self.labels[index])

    def iter_windows(self, seq_len: int, max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The windows in packing order as (window, labels) pairs (validation)."""
        self._check(seq_len)
        count = len(self) if max_windows is None else min(max_windows, len(self))
        for i in range(count):
            yield self.windows[i], self.labels[i]

    def all_windows(self) -> LabeledWindows:
        return LabeledWindows(self.windows, self.labels)
