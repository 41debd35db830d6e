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
        binary=2, empty=1, unreadable=1, broken_symlink=1, missing_text_column=2, unsupported_extension=1,
        malformed_json=1,
    )
    for name in ("image.txt", "blob.md", "empty.txt", "broken.txt", "notext.parquet", "notext.csv", "photo.jpg"):
        assert name in caplog.text
    assert tally.files_read == 1


def test_repairs_bom_crlf_nul_encodings_utf16(tmp_path, caplog):
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + b"line one\r\nline two\rthree")
    (tmp_path / "nul.txt").write_bytes(b"nul\x00 inside text, with\x00embedded words")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "wide.txt").write_bytes("wide text ✓".encode("utf-16"))
    (tmp_path / "latin1.csv").write_bytes(b"text\ncaf\xe9\n")
    (tmp_path / "damaged.txt").write_bytes("naïve UTF-8 with one bad byte ".encode() + b"\xff here")
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path)
    texts = {d.source: d.text for d in docs}
    assert texts["file:bom.txt"] == "line one\nline two\nthree"
    assert texts["file:nul.txt"] == "nul inside text, with embedded words"  # NUL between letters: a space
    assert texts["file:latin1.txt"] == "café crème"
    assert texts["file:wide.txt"] == "wide text ✓"
    assert texts["file:latin1.csv"] == "café"
    assert texts["file:damaged.txt"] == "naïve UTF-8 with one bad byte \ufffd here"  # damaged UTF-8 stays UTF-8
    assert tally.repaired == Counter(
        bom_removed=1, crlf_normalized=1, nul_bytes_removed=1, reencoded=2, invalid_utf8_replaced=1, utf16_decoded=1
    )
    assert "bom.txt: repaired" in caplog.text and "latin1.csv: repaired" in caplog.text


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Der Bär läuft über die Straße, während die Kühe grasen. " * 5, "latin-1"),
        ("“Smart quotes” cost €5 — café, naïve, façade, crème brûlée. " * 5, "cp1252"),
        ("Привет, мир! Это текст в старой кодировке Windows. " * 5, "cp1251"),
    ],
)
def test_non_utf8_encodings_are_detected_and_decoded(tmp_path, text, encoding):
    (tmp_path / "legacy.txt").write_bytes(text.encode(encoding))
    (tmp_path / "legacy.jsonl").write_bytes(json.dumps({"text": text}, ensure_ascii=False).encode(encoding) + b"\n")
    docs, tally = _read(tmp_path)
    assert [d.text for d in docs] == [text, text]
    assert tally.repaired == Counter(reencoded=2)


def test_malformed_jsonl_lines_are_skipped_not_fatal(tmp_path, caplog):
    lines = ['{"text": "ok 1"}', "{broken", '{"text": 5}', "[1, 2]", '"bare string"', '{"text": "ok 2"}']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')  # JSON Lines saved as .json
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path)
    assert [d.text for d in docs] == ["a", "b", "ok 1", "bare string", "ok 2"]
    assert tally.records_skipped == Counter(malformed_json=1, missing_text_field=2)
    assert "mixed.jsonl: skipped 1 record(s): malformed_json" in caplog.text


def test_huge_line_text_is_read_in_pieces_and_huge_json_line_skipped(tmp_path, caplog):
    (tmp_path / "huge.txt").write_bytes(b"x" * (5 << 20))  # one 5 MB line, no newline
    (tmp_path / "huge.jsonl").write_bytes(b'{"text": "' + b"y" * (3 << 20) + b'"}\n{"text": "small"}\n')
    with caplog.at_level(logging.WARNING):
        tally = Tally()
        sizes = [(d.source, len(d.text), d.origin) for d in iter_source(SourceConfig(kind="files"), tmp_path, tally, 1 << 20)]
    huge = [s for s in sizes if s[0] == "file:huge.txt"]
    assert sum(n for _, n, _ in huge) == 5 << 20 and max(n for _, n, _ in huge) <= 1 << 20
    assert len({origin for _, _, origin in huge}) == 1 and huge[0][2] is not None
    assert [s for s in sizes if s[0] == "file:huge.jsonl"] == [("file:huge.jsonl", 5, None)]
    assert tally.records_skipped == Counter(line_too_long=1)
    assert "huge.jsonl: skipped 1 record(s): line_too_long" in caplog.text


def test_large_text_file_is_split_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 50 for i in range(200)]
    text = "\n\n".join(paragraphs) + "\n"
    (tmp_path / "book.txt").write_text(text)
    docs, tally = _read(tmp_path, limit=4096)
    assert len(docs) > 5 and all(len(d.text.encode()) <= 4096 for d in docs)
    assert all(d.text.endswith("\n\n") for d in docs[:-1])  # cut at paragraph ends
    assert "".join(d.text for d in docs) == text  # nothing lost, nothing duplicated
    assert len({d.origin for d in docs}) == 1 and docs[0].origin is not None
    assert not tally.records_skipped


def _csv_rows(n: int) -> list[str]:
    return [f"Row {i} is a plain sentence about CSV parsing,{i}" for i in range(n)]


def test_csv_stray_quote_costs_one_row_not_the_rest_of_the_file(tmp_path, caplog):
    rows = _csv_rows(1000)
    rows[2] = '"Row 2 opens a quote it never closes,2'
    rows[500] = '"Row 500, quoted properly",500'  # the next quote: where the stray one used to close
    rows[700] = 'Row 700 has "inner" quotes,700'  # a quote inside an unquoted field is text
    rows[800] = "Row 800 has one field too many,800,extra"
    (tmp_path / "rows.csv").write_text("text,n\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        docs, tally = _read(tmp_path)
    texts = [d.text for d in docs]
    assert len(texts) == 998 and max(len(t) for t in texts) < 100
    assert "Row 500, quoted properly" in texts and 'Row 700 has "inner" quotes' in texts and "Row 3 is" in texts[2]
    assert tally.records_skipped == Counter(csv_stray_quote=1, csv_wrong_field_count=1)
    assert "rows.csv: skipped 1 record(s): csv_stray_quote" in caplog.text


def test_csv_unclosed_quote_and_field_over_the_limit_skip_one_row(tmp_path):
    rows = _csv_rows(50)
    rows[10] = '"' + "A huge quoted field.\n" * 400 + '",10'  # 8.4 kB, over the 4 kB limit
    rows[49] = '"the last row never closes its quote,49'
    (tmp_path / "big.csv").write_text("text,n\n" + "\n".join(rows) + "\n")
    docs, tally = _read(tmp_path, limit=4096)
    assert [d.text for d in docs] == [r.rsplit(",", 1)[0] for i, r in enumerate(rows) if i not in (10, 49)]
    assert tally.records_skipped == Counter(csv_field_too_large=1, csv_unclosed_quote=1)
    # a stray quote in a file bigger than the limit: the swallowed rows are read again
    rows = _csv_rows(400)
    rows[5] = '"stray,5'
    (tmp_path / "big.csv").write_text("text,n\n" + "\n".join(rows) + "\n")
    docs, tally = _read(tmp_path, limit=4096)
    assert len(docs) == 399 and tally.records_skipped == Counter(csv_field_too_large=1)


def test_source_without_its_text_field_fails_naming_field_and_keys(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": PROSE, "id": 1}) + "\n")
    (tmp_path / "b.csv").write_text("body,label\nx,1\n")
    with pytest.raises(SourceError, match=r"prepare.sources.*'\*\*/\*'.*text_field 'text'.*\['body', 'content', 'id',"):
        _read(tmp_path)
    assert _read(tmp_path, text_field="content", glob="*.jsonl")[0][0].text == PROSE


def test_glob_matching_nothing_and_missing_raw_dir_are_noted(tmp_path):
    docs, tally = _read(tmp_path, glob="books/*.txt")
    assert docs == [] and tally.notes == [
        f"prepare.sources (files 'books/*.txt' under {tmp_path}): the glob 'books/*.txt' matches no file"
    ]
    docs, tally = _read(tmp_path / "missing")
    assert docs == [] and "paths.raw" in tally.notes[0] and str(tmp_path / "missing") in tally.notes[0]


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
    with pytest.raises(SourceError, match=r"no column 'text' \(text_field\); columns: \['content', 'n'\]"):
        list(iter_source(SourceConfig(kind="hf", name=str(tmp_path / "hf")), tmp_path, Tally(), 1 << 20))


def test_max_documents_caps_a_source(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    docs, _ = _read(tmp_path, max_documents=2)
    assert [d.text for d in docs] == ["doc 0", "doc 1"]
