"""The corpus format shared by `prepare`, `augment`, `tokenizer` and `tokenize`: a directory of Parquet parts.

A corpus is `<dir>/part-NNNNN.parquet`, columns `id` (stable content-hash document id), `text`, `source`, `lang`,
`split` ("train" | "val"); the augmented corpus adds nullable provenance columns. `CorpusWriter` streams rows into
parts of at most `rows_per_file` rows (memory stays flat however large the corpus grows) inside a temp directory
that replaces the target only on a clean close; `read_corpus` streams record batches back, optionally one split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpt.atomic import make_temp_dir, replace_dir
from gpt.errors import GptError

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
SPLITS = ("train", "val")
PART_GLOB = "part-*.parquet"


class CorpusError(GptError, ValueError):
    """A corpus directory is missing, empty or lacks a needed column."""


def corpus_parts(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusError(f"corpus directory not found: {directory} (run the stage that writes it first)")
    parts = sorted(directory.glob(PART_GLOB))
    if not parts:
        raise CorpusError(f"no {PART_GLOB} files in corpus directory {directory}")
    return parts


def read_corpus(
    directory: str | Path,
    split: str | None = None,
    columns: list[str] | None = None,
    batch_size: int = 1024,
) -> Iterator[pa.RecordBatch]:
    """Stream the corpus as record batches in part order, optionally only rows of one `split`.

    `columns` selects columns (all when None); filtering by split works even if "split" is not among them.
    """
    if split is not None and split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    for part in corpus_parts(directory):
        pfile = pq.ParquetFile(part)
        names = pfile.schema_arrow.names
        wanted = list(columns) if columns is not None else names
        missing = [c for c in wanted + (["split"] if split else []) if c not in names]
        if missing:
            raise CorpusError(f"{part}: missing column(s) {missing}; has {names}")
        read_cols = wanted + (["split"] if split and "split" not in wanted else [])
        for batch in pfile.iter_batches(batch_size=batch_size, columns=read_cols):
            if split is not None:
                batch = batch.filter(pc.equal(batch.column("split"), split))
                if "split" not in wanted:
                    batch = batch.select(wanted)
            if batch.num_rows:
                yield batch


def count_rows(directory: str | Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in corpus_parts(directory))


class CorpusWriter:
    """Write a corpus directory in parts; atomic: the target is replaced only when the `with` block succeeds.

    `write()` takes a list of row dicts (missing nullable columns become null) or a RecordBatch/Table with the
    writer's schema. Rows are buffered up to `buffer_rows` or `buffer_bytes` of text, then written as one row group.
    """

    def __init__(
        self,
        directory: str | Path,
        schema: pa.Schema | None = None,
        rows_per_file: int = 100_000,
        buffer_rows: int = 2048,
        buffer_bytes: int = 32 << 20,
        compression: str = "zstd",
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.directory = Path(directory)
        self.schema = schema if schema is not None else CORPUS_SCHEMA
        self.rows_per_file = rows_per_file
        self.buffer_rows = max(1, min(buffer_rows, rows_per_file))
        self.buffer_bytes = buffer_bytes
        self.compression = compression
        self.num_rows = 0
        self.num_files = 0
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._buffer: list[pa.Table] = []
        self._buffered_rows = 0
        self._buffered_bytes = 0

    def __enter__(self) -> CorpusWriter:
        self._tmp = make_temp_dir(self.directory)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, rows: list[dict[str, Any]] | pa.RecordBatch | pa.Table) -> None:
        if self._tmp is None:
            raise RuntimeError("CorpusWriter must be used as a context manager (`with CorpusWriter(...) as w:`)")
        if isinstance(rows, (pa.RecordBatch, pa.Table)):
            table = pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else rows
            table = table.select(self.schema.names).cast(self.schema)
        else:
            if not rows:
                return
            table = pa.Table.from_pylist(list(rows), schema=self.schema)
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered_rows += table.num_rows
        self._buffered_bytes += table.nbytes
        if self._buffered_rows >= self.buffer_rows or self._buffered_bytes >= self.buffer_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._rows_in_file >= self.rows_per_file:
                self._open_next_file()
            take = min(table.num_rows - offset, self.rows_per_file - self._rows_in_file)
            self._writer.write_table(table.slice(offset, take), row_group_size=take)
            self._rows_in_file += take
            self.num_rows += take
            offset += take

    def _open_next_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self._tmp / f"part-{self.num_files:05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema, compression=self.compression)
        self.num_files += 1
        self._rows_in_file = 0

    def close(self) -> None:
        """Flush, finish the last part and move the directory into place (an empty corpus is still one part)."""
        if self._tmp is None:
            return
        self._flush()
        if self._writer is None:
            self._open_next_file()  # readers expect at least one part; an empty part keeps the schema
        self._writer.close()
        self._writer = None
        replace_dir(self._tmp, self.directory)
        self._tmp = None

    def abort(self) -> None:
        import shutil

        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
