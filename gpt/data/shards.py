"""Token shards: the `tokenize` stage's output and the training/eval data loader.

Layout: `<shards>/<split>/manifest.json` + `shard-NNNNN.arrow`, each shard an Arrow IPC file with one `tokens`
column (uint16 when the vocabulary fits, else uint32) holding a fixed number of tokens (the last one shorter).
Documents are concatenated with EOS after each one, so the split is one long token stream.

`ShardWriter` streams tokens into shards (memory: one shard). `TokenShards` memory-maps the shards (nothing is
read until used) and serves training windows `[batch, seq_len + 1]` whose positions depend only on
(seed, step, rank, world_size) — a resumed run sees exactly the batches an uninterrupted one would — and sequential
non-overlapping windows for evaluation. It refuses shards made with a different tokenizer or vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from gpt.atomic import write_json_atomic
from gpt.errors import GptError

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
TOKENS_COLUMN = "tokens"


class ShardError(GptError, ValueError):
    """Shards are missing, corrupt, or do not match the tokenizer/vocabulary they are used with."""


ARROW_TYPES = {np.dtype(np.uint16): pa.uint16(), np.dtype(np.uint32): pa.uint32()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65,536; larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays for one split; writes fixed-size shards and, on `close()`, the manifest.

    Write into a fresh directory (the `tokenize` stage builds all splits in a temp dir and swaps it in atomically).
    """

    def __init__(
        self, split_dir: str | Path, split: str, vocab_size: int, tokenizer_sha256: str, shard_tokens: int
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.split_dir = Path(split_dir)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.vocab_size = vocab_size
        self.tokenizer_sha256 = tokenizer_sha256
        self.shard_tokens = shard_tokens
        self.dtype = token_dtype(vocab_size)
        self._buffer = np.empty(shard_tokens, dtype=self.dtype)
        self._filled = 0
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0
        self.num_bytes = 0

    def add_document(self, ids: np.ndarray | list[int], num_bytes: int) -> None:
        """Add one document's ids (EOS already appended by the caller) and its UTF-8 byte count."""
        self.add_tokens(ids, num_bytes, num_documents=1)

    def add_tokens(self, ids: np.ndarray | list[int], num_bytes: int, num_documents: int) -> None:
        """Add the ids of `num_documents` consecutive documents (EOS after each) holding `num_bytes` of text."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ShardError(f"token id out of range [0, {self.vocab_size}) in split {self.split}")
        self.num_documents += num_documents
        self.num_bytes += num_bytes
        self._append(arr)

    def _append(self, arr: np.ndarray) -> None:
        offset = 0
        while offset < arr.size:
            take = min(arr.size - offset, self.shard_tokens - self._filled)
            self._buffer[self._filled : self._filled + take] = arr[offset : offset + take]
            self._filled += take
            offset += take
            if self._filled == self.shard_tokens:
                self._write_shard()

    def _write_shard(self) -> None:
        if self._filled == 0:
            return
        name = f"shard-{len(self.shards):05d}.arrow"
        # from_buffers wraps the NumPy memory as is (pa.array would import pandas on first use: ~0.15 s)
        data = pa.py_buffer(self._buffer[: self._filled])
        tokens = pa.Array.from_buffers(ARROW_TYPES[self.dtype], self._filled, [None, data])
        table = pa.table({TOKENS_COLUMN: tokens})
        with pa.OSFile(str(self.split_dir / name), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        self.shards.append({"file": name, "num_tokens": int(self._filled)})
        self.num_tokens += self._filled
        self._filled = 0

    def close(self) -> dict:
        """Write the last partial shard and the manifest; returns the manifest."""
        self._write_shard()
        manifest = {
            "split": self.split,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "num_tokens": int(self.num_tokens),
            "num_documents": int(self.num_documents),
            "num_bytes": int(self.num_bytes),
            "shard_tokens": self.shard_tokens,
            "shards": self.shards,
        }
        write_json_atomic(self.split_dir / MANIFEST, manifest)
        return manifest


def read_manifest(split_dir: str | Path) -> dict:
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in {split_dir} (run `dvc repro tokenize` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: corrupt manifest ({err})") from err


class TokenShards:
    """Memory-mapped token stream of one split, with deterministic training batches and eval windows."""

    def __init__(
        self, split_dir: str | Path, tokenizer_sha256: str | None = None, vocab_size: int | None = None
    ) -> None:
        self.split_dir = Path(split_dir)
        self.manifest = read_manifest(self.split_dir)
        self.manifest_sha256 = hashlib.sha256((self.split_dir / MANIFEST).read_bytes()).hexdigest()
        m = self.manifest
        if tokenizer_sha256 is not None and m["tokenizer_sha256"] != tokenizer_sha256:
            raise ShardError(
                f"{self.split_dir}: shards were made with tokenizer sha256 {m['tokenizer_sha256'][:12]}…, "
                f"but the tokenizer in use is {tokenizer_sha256[:12]}… (re-run `dvc repro tokenize`)"
            )
        if vocab_size is not None and m["vocab_size"] != vocab_size:
            raise ShardError(
                f"{self.split_dir}: shards have vocab_size {m['vocab_size']}, the model expects {vocab_size}"
            )
        self.vocab_size: int = m["vocab_size"]
        self.tokenizer_sha256: str = m["tokenizer_sha256"]
        self.num_bytes: int = m["num_bytes"]
        self.num_documents: int = m["num_documents"]
        self._arrays = [self._map_shard(s) for s in m["shards"]]
        self.num_tokens = int(sum(a.size for a in self._arrays))
        if self.num_tokens != m["num_tokens"]:
            raise ShardError(f"{self.split_dir}: manifest says {m['num_tokens']} tokens, shards hold {self.num_tokens}")
        # ends[i] = index one past the last token of shard i in the concatenated stream
        self._ends = np.cumsum([a.size for a in self._arrays], dtype=np.int64)

    def _map_shard(self, entry: dict) -> np.ndarray:
        path = self.split_dir / entry["file"]
        try:
            source = pa.memory_map(str(path), "r")
            table = pa.ipc.open_file(source).read_all()
            column = table.column(TOKENS_COLUMN).combine_chunks()
            arr = column.to_numpy(zero_copy_only=True)  # a view into the mapped file
        except (OSError, pa.ArrowInvalid, KeyError) as err:
            raise ShardError(f"{path}: unreadable shard ({err})") from err
        if arr.dtype != np.dtype(self.manifest["dtype"]) or arr.size != entry["num_tokens"]:
            raise ShardError(f"{path}: dtype/length do not match the manifest")
        return arr

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (may span shards)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"range [{start}, {start + length}) outside 0..{self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._ends, start, side="right"))
        filled = 0
        while filled < length:
            begin = 0 if shard == 0 else int(self._ends[shard - 1])
            local = start + filled - begin
            take = min(length - filled, self._arrays[shard].size - local)
            out[filled : filled + take] = self._arrays[shard][local : local + take]
            filled += take
            shard += 1
        return out

    def window_starts(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int) -> np.ndarray:
        """Start offsets of this rank's windows at `step`: a global batch of batch_size*world_size uniform starts
        drawn from (seed, step), of which rank r takes the r-th slice, so ranks never share a draw and the union
        over ranks equals a single process with the global batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if self.num_tokens < seq_len + 1:
            raise ShardError(
                f"{self.split_dir}: {self.num_tokens} tokens cannot fill one window of seq_len+1 = {seq_len + 1}"
            )
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
        starts = rng.integers(0, self.num_tokens - seq_len, size=batch_size * world_size, dtype=np.int64)
        return starts[rank * batch_size : (rank + 1) * batch_size]

    def get_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """LongTensor [batch_size, seq_len + 1] (inputs = [:, :-1], targets = [:, 1:]), deterministic in its args."""
        import torch

        starts = self.window_starts(step, batch_size, seq_len, seed, rank, world_size)
        rows = np.stack([self.read(int(s), seq_len + 1) for s in starts])
        return torch.from_numpy(rows)

    def num_windows(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def iter_windows(self, seq_len: int, max_windows: int | None = None) -> Iterator[torch.Tensor]:
        """Sequential windows [seq_len + 1] starting at 0, seq_len, 2*seq_len, ...: consecutive windows share one
        token (the last target of one is the first input of the next), so every token after the first is predicted
        exactly once across the windows."""
        import torch

        count = self.num_windows(seq_len)
        if max_windows is not None:
            count = min(count, max_windows)
        for i in range(count):
            yield torch.from_numpy(self.read(i * seq_len, seq_len + 1))
