"""`tokenize`: a corpus split → token shards, encoding batches of documents on all cores.

Reading the next Parquet batch, encoding (sentencepiece, its own thread pool, GIL released) and writing shards
overlap: a background thread encodes batch i+1 while the main thread appends batch i to the shard writer. Memory
holds two batches of text and one shard of tokens, whatever the corpus size.

Nothing here converts Python or NumPy objects into Arrow (no `pa.array`, `pa.scalar`, compute calls with Python
arguments, `to_numpy` of a computed array): pyarrow imports pandas the first time it does, ~0.15 s on an idle
2-core machine — the whole start-up gap to plain sentencepiece on the default corpus (bench/README.md, tokenize).
The split is selected in Python from the `split` column, and byte lengths are read from Arrow's offsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from gpt.config import ConfigError
from gpt.data.corpus import read_corpus
from gpt.data.shards import ShardWriter
from gpt.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """params.yaml `tokenize:`."""

    shard_tokens: int = 1 << 20  # tokens per shard file (2 MiB as uint16)
    # One encode call gets up to batch_documents documents or batch_bytes of text, whichever comes first. Big
    # batches keep all threads busy (one long document at the end of a small batch leaves the others idle);
    # memory holds two batches.
    batch_documents: int = 8192
    batch_bytes: int = 8 << 20
    num_threads: int = -1  # encode threads; -1 = all cores (the result does not depend on it)

    def __post_init__(self) -> None:
        if self.shard_tokens < 1024:
            raise ConfigError(f"tokenize.shard_tokens: must be >= 1024, got {self.shard_tokens}")
        if self.batch_documents < 1:
            raise ConfigError(f"tokenize.batch_documents: must be >= 1, got {self.batch_documents}")
        if self.batch_bytes < 1:
            raise ConfigError(f"tokenize.batch_bytes: must be >= 1, got {self.batch_bytes}")
        if self.num_threads == 0 or self.num_threads < -1:
            raise ConfigError(f"tokenize.num_threads: must be -1 (all cores) or >= 1, got {self.num_threads}")


def _utf8_lengths(column: pa.Array) -> list[int]:
    """UTF-8 byte length of each string of an Arrow string/large_string array, from its offsets buffer."""
    offset_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], dtype=offset_type)[column.offset:column.offset + len(column) + 1]
    return np.diff(offsets).tolist()


def _text_batches(corpus_dir: Path, split: str, cfg: TokenizeConfig) -> Iterator[tuple[list[str], int]]:
    """(texts, their UTF-8 bytes) in corpus order, cut at batch_documents / batch_bytes."""
    texts: list[str] = []
    size = 0
    batch_size = min(cfg.batch_documents, 1024)
    for batch in read_corpus(corpus_dir, columns=["text", "split"], batch_size=batch_size):
        column = batch.column("text")
        rows = zip(column.to_pylist(), _utf8_lengths(column), batch.column("split").to_pylist())
        for text, length, row_split in rows:
            if row_split != split:
                continue
            texts.append(text)
            size += length
            if len(texts) >= cfg.batch_documents or size >= cfg.batch_bytes:
                yield texts, size
                texts, size = [], 0
    if texts:
        yield texts, size


def _encoded_batches(
    tokenizer: Tokenizer, corpus_dir: Path, split: str, cfg: TokenizeConfig
) -> Iterator[tuple[np.ndarray, int, int]]:
    """(token ids with EOS after each document, UTF-8 bytes, documents) per batch, encoded one batch ahead."""

    def encode(texts: list[str], num_bytes: int) -> tuple[np.ndarray, int, int]:
        arrays = tokenizer.encode_batch_numpy(texts, num_threads=cfg.num_threads, add_eos=True)
        return np.concatenate(arrays), num_bytes, len(arrays)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for texts, num_bytes in _text_batches(corpus_dir, split, cfg):
            future = pool.submit(encode, texts, num_bytes)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def tokenize_split(
    tokenizer: Tokenizer, corpus_dir: Path, split: str, split_dir: Path, cfg: TokenizeConfig
) -> dict:
    """Encode one split into `split_dir` (shards + manifest); returns the manifest."""
    writer = ShardWriter(split_dir, split, tokenizer.vocab_size, tokenizer.sha256, cfg.shard_tokens)
    progress = tqdm(desc=f"tokenize {split}", unit="B", unit_scale=True, mininterval=2.0, disable=None)
    for ids, num_bytes, num_docs in _encoded_batches(tokenizer, corpus_dir, split, cfg):
        writer.add_tokens(ids, num_bytes=num_bytes, num_documents=num_docs)
        progress.update(num_bytes)
    progress.close()
    return writer.close()
