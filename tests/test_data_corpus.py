"""Corpus Parquet I/O: round trip, split filtering, parts, atomicity."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gpt.data.corpus import CORPUS_SCHEMA, CorpusError, CorpusWriter, count_rows, read_corpus


def _rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"d{i}", "text": f"text {i}", "source": "t", "lang": "en", "split": "val" if i % 3 == 0 else "train"}
        for i in range(start, start + n)
    ]


def _ids(directory, **kw) -> list[str]:
    return [i for b in read_corpus(directory, **kw) for i in b.column("id").to_pylist()]


def test_round_trip_in_order_across_parts(tmp_path):
    out = tmp_path / "corpus"
    with CorpusWriter(out, rows_per_file=4, buffer_rows=3) as w:
        w.write(_rows(5))
        w.write(pa.RecordBatch.from_pylist(_rows(6, start=5), schema=CORPUS_SCHEMA))
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    assert _ids(out) == [f"d{i}" for i in range(11)]
    assert count_rows(out) == 11


def test_split_filter_equals_python_filter(tmp_path):
    with CorpusWriter(tmp_path / "c", rows_per_file=2) as w:
        w.write(_rows(10))
    for split in ("train", "val"):
        expected = [r["id"] for r in _rows(10) if r["split"] == split]
        assert _ids(tmp_path / "c", split=split) == expected
        batches = list(read_corpus(tmp_path / "c", split=split, columns=["text"]))
        assert all(b.schema.names == ["text"] for b in batches)


def test_failure_leaves_previous_corpus_untouched(tmp_path):
    out = tmp_path / "c"
    with CorpusWriter(out) as w:
        w.write(_rows(3))
    with pytest.raises(RuntimeError), CorpusWriter(out) as w:
        w.write(_rows(5, start=100))
        raise RuntimeError("crash mid-write")
    assert _ids(out) == ["d0", "d1", "d2"]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp dirs left behind


def test_extra_nullable_columns_and_missing_dir(tmp_path):
    schema = CORPUS_SCHEMA.append(pa.field("origin_id", pa.string()))
    with CorpusWriter(tmp_path / "aug", schema=schema) as w:
        w.write(_rows(2))  # origin_id missing -> null
    batch = next(read_corpus(tmp_path / "aug"))
    assert batch.column("origin_id").null_count == 2
    with pytest.raises(CorpusError, match="not found"):
        list(read_corpus(tmp_path / "nope"))
    with pytest.raises(CorpusError, match="missing column"):
        list(read_corpus(tmp_path / "aug", columns=["nope"]))


def test_empty_writer_still_writes_readable_part(tmp_path):
    with CorpusWriter(tmp_path / "c"):
        pass
    assert list(read_corpus(tmp_path / "c")) == []
    assert count_rows(tmp_path / "c") == 0
