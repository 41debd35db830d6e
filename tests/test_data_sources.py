"""Raw sources: every supported format, and every bad-input class skipped or repaired, counted and warned."""

from __future__ import annotations

import codecs
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt.data.sources import SourceConfig, SourceError, Tally, decode_text, iter_source

PROSE = "A paragraph of ordinary English prose about parsers and modules."


def _read(raw, limit=1 << 20, **cfg):
    tally = Tally()
    docs = list(iter_source(SourceConfig(kind="files", **cfg), raw, tally, limit))
    return docs, tally


def test_formats_read_in_sorted_order(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n" + PROSE)
    (tmp_path / "a.txt").write_text(PROSE)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "x1"}, {"body": "x2"}]))
    (tmp_path / "e.csv").write_text('text,label\n"multi\nline, quoted",1\nplain,2\n')
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), tmp_path / "f.parquet")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.txt").write_text("nested")
    (tmp_path / ".gitignore").write_text("/x")  # git/DVC bookkeeping is ignored, not counted
    (tmp_path / "h.txt.dvc").write_text("outs: []")
    docs, tally = _read(tmp_path)
    assert [(d.source, d.text) for d in docs] == [
        ("file:a.txt", PROSE),
        ("file:b.md", "# Title\n" + PROSE),
        ("file:c.jsonl", "j1"),
        ("file:c.jsonl", "j2"),
        ("file:e.csv", "multi\nline, quoted"),
        ("file:e.csv", "plain"),
        ("file:f.parquet", "p1"),
        ("file:f.parquet", "p2"),
        ("file:sub/g.txt", "nested"),
    ]
    # d.json has no "text" field: both records counted as skipped; the null Parquet value too
    assert tally.records_skipped == Counter(missing_text_field=3)
    assert _read(tmp_path, text_field="body", glob="*.json")[0][1].text == "x2"


def test_bad_files_are_skipped_counted_and_warned(tmp_path, caplog):
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (tmp_path / "blob.md").write_bytes(bytes(range(32)) * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "broken.txt").symlink_to(tmp_path / "does-not-exist")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    (tmp_path / "notext.csv").write_text("title,body\na,b\n")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "garbage.json").write_text("{not json\nnor this\n")
    (tmp_path / "good.txt").write_text(PROSE)
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path)
    assert [d.text for d in docs] == [PROSE]
    assert tally.files_skipped == Counter(
        binary=2, empty=1, unreadable=2, missing_text_column=2, unsupported_extension=1, malformed_json=1
    )
    for name in ("image.txt", "blob.md", "empty.txt", "broken.txt", "notext.parquet", "notext.csv", "photo.jpg"):
        assert name in caplog.text
    assert tally.files_read == 1


def test_repairs_bom_crlf_nul_invalid_utf8_utf16(tmp_path, caplog):
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + b"line one\r\nline two\rthree")
    (tmp_path / "nul.txt").write_bytes(b"nul\x00 inside text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "wide.txt").write_bytes("wide text ✓".encode("utf-16"))
    (tmp_path / "latin1.csv").write_bytes(b"text\ncaf\xe9\n")
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path)
    texts = {d.source: d.text for d in docs}
    assert texts["file:bom.txt"] == "line one\nline two\nthree"
    assert texts["file:nul.txt"] == "nul inside text"
    assert texts["file:latin1.txt"] == "caf\ufffd cr\ufffdme"
    assert texts["file:wide.txt"] == "wide text ✓"
    assert texts["file:latin1.csv"] == "caf\ufffd"
    assert tally.repaired == Counter(
        bom_removed=1, crlf_normalized=1, nul_bytes_removed=1, invalid_utf8_replaced=2, utf16_decoded=1
    )
    assert "bom.txt: repaired" in caplog.text and "latin1.csv: repaired" in caplog.text


def test_malformed_jsonl_lines_are_skipped_not_fatal(tmp_path, caplog):
    lines = ['{"text": "ok 1"}', "{broken", '{"text": 5}', "[1, 2]", '"bare string"', '{"text": "ok 2"}']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')  # JSON Lines saved as .json
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path)
    assert [d.text for d in docs] == ["a", "b", "ok 1", "bare string", "ok 2"]
    assert tally.records_skipped == Counter(malformed_json=1, missing_text_field=2)
    assert "mixed.jsonl: skipped 1 record(s): malformed_json" in caplog.text


def test_huge_single_line_is_skipped_with_constant_memory(tmp_path, caplog):
    (tmp_path / "huge.txt").write_bytes(b"x" * (50 << 20))  # one 50 MB line, no newline
    (tmp_path / "huge.jsonl").write_bytes(b'{"text": "' + b"y" * (3 << 20) + b'"}\n{"text": "small"}\n')
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path, limit=1 << 20)
    assert [d.text for d in docs] == ["small"]
    assert tally.records_skipped == Counter(line_too_long=2)
    assert "huge.txt: skipped 1 record(s): line_too_long" in caplog.text


def test_large_text_file_is_split_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 50 for i in range(200)]
    text = "\n\n".join(paragraphs) + "\n"
    (tmp_path / "book.txt").write_text(text)
    docs, tally = _read(tmp_path, limit=4096)
    assert len(docs) > 5 and all(len(d.text.encode()) <= 4096 for d in docs)
    assert "".join(d.text for d in docs) == text  # nothing lost, nothing duplicated
    assert not tally.records_skipped


def test_decode_text_counts():
    repairs = Counter()
    assert decode_text(b"plain", repairs) == "plain" and not repairs


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["first doc", None, "second doc"], "n": [1, 2, 3]}),
            "test": datasets.Dataset.from_dict({"content": ["held out"], "n": [4]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    tally = Tally()
    cfg = SourceConfig(kind="hf", name=str(tmp_path / "hf"), text_field="content", lang="xx")
    docs = list(iter_source(cfg, tmp_path, tally, 1 << 20))
    assert [(d.text, d.lang) for d in docs] == [("first doc", "xx"), ("second doc", "xx")]
    assert docs[0].source.startswith("hf:") and tally.records_skipped == Counter(missing_text_field=1)
    test_split = SourceConfig(kind="hf", name=str(tmp_path / "hf"), text_field="content", split="test")
    assert [d.text for d in iter_source(test_split, tmp_path, Tally(), 1 << 20)] == ["held out"]
    with pytest.raises(SourceError, match="splits"):
        list(iter_source(SourceConfig(kind="hf", name=str(tmp_path / "hf"), split="nope"), tmp_path, tally, 1 << 20))
    wrong = Tally()
    assert list(iter_source(SourceConfig(kind="hf", name=str(tmp_path / "hf")), tmp_path, wrong, 1 << 20)) == []
    assert wrong.files_skipped == Counter(missing_text_column=1)


def test_max_documents_caps_a_source(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    docs, _ = _read(tmp_path, max_documents=2)
    assert [d.text for d in docs] == ["doc 0", "doc 1"]
