"""`prepare` end to end in-process: counts, split stability, empty-result error, langid, the built-in corpus."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.config import ConfigError, from_dict
from gpt.data.builtin import BuiltinStats, iter_builtin_documents
from gpt.data.corpus import read_corpus
from gpt.data.dedup import content_id
from gpt.data.prepare import (
    PrepareConfig,
    PrepareError,
    RawDataError,
    SplitConfig,
    assign_split,
    origin_id,
    prepare_corpus,
)
from gpt.data.sources import SourceError

TOPICS = ["parsers", "sockets", "threads", "queues", "files", "strings", "numbers", "dates", "paths", "codecs"]


def _doc(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return " ".join(f"Document {i} sentence {j} explains how {topic} work in example {i * 31 + j}." for j in range(8))


def _cfg(**overrides) -> PrepareConfig:
    base = {"sources": [{"kind": "files"}], "clean": {"min_chars": 50}, "split": {"val_fraction": 0.3}}
    return from_dict(PrepareConfig, base | overrides, "prepare")


def _rows(directory: Path) -> list[dict]:
    return [r for b in read_corpus(directory) for r in b.to_pylist()]


def test_counts_every_drop_and_repair(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(20):
        (raw / f"doc{i:02d}.txt").write_text(_doc(i))
    (raw / "dup.txt").write_text(_doc(3))  # exact duplicate of doc03
    (raw / "near.txt").write_text(_doc(5).replace("sentence 2 explains", "sentence 2 shows"))
    (raw / "short.txt").write_text("too short")
    (raw / "crlf.txt").write_bytes(_doc(30).replace(". ", ".\r\n").encode())
    (raw / "bin.txt").write_bytes(b"\x7fELF" + bytes(200))
    (raw / "bad.jsonl").write_text(json.dumps({"text": _doc(40)}) + "\n{oops\n")
    metrics = prepare_corpus(_cfg(), raw, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert metrics["documents_in"] == 25 and metrics["documents_out"] == len(rows) == 22
    assert metrics["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1, "too_short": 1}
    assert metrics["inputs"]["files_skipped"] == {"binary": 1}
    assert metrics["inputs"]["records_skipped"] == {"malformed_json": 1}
    assert metrics["inputs"]["repaired"] == {"crlf_normalized": 1}
    assert metrics["bytes_out"] == sum(len(r["text"].encode()) for r in rows)
    for split in ("train", "val"):
        assert metrics["splits"][split]["documents"] == sum(r["split"] == split for r in rows) > 0
    assert all(r["split"] == assign_split(r["id"], SplitConfig(val_fraction=0.3)) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert json.loads(json.dumps(metrics)) == metrics  # JSON-safe for metrics/prepare.json


def test_adding_documents_never_moves_old_ones(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(15):
        (raw / f"a{i:02d}.txt").write_text(_doc(i))
    prepare_corpus(_cfg(), raw, tmp_path / "small")
    for i in range(15, 40):
        (raw / f"b{i:02d}.txt").write_text(_doc(i))
    prepare_corpus(_cfg(), raw, tmp_path / "big")
    small = {r["id"]: r["split"] for r in _rows(tmp_path / "small")}
    big = {r["id"]: r["split"] for r in _rows(tmp_path / "big")}
    assert small.items() <= big.items()
    again = tmp_path / "again"
    prepare_corpus(_cfg(), raw, again)
    assert [p.read_bytes() for p in sorted(again.iterdir())] == [p.read_bytes() for p in sorted((tmp_path / "big").iterdir())]


def test_everything_filtered_is_a_clear_error_and_keeps_old_output(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text(_doc(1))
    prepare_corpus(_cfg(), raw, tmp_path / "out")
    before = _rows(tmp_path / "out")
    with pytest.raises(PrepareError, match="no documents left.*too_short"):
        prepare_corpus(_cfg(clean={"min_chars": 100_000, "max_chars": 200_000}), raw, tmp_path / "out")
    assert _rows(tmp_path / "out") == before
    missing = tmp_path / "missing-raw-dir"
    with pytest.raises(PrepareError, match=f"no documents left.*'\\*\\*/\\*' under {missing}.*does not exist"):
        prepare_corpus(_cfg(), missing, tmp_path / "out2")
    with pytest.raises(PrepareError, match=f"no documents left.*'books/\\*.txt' under {raw}.*matches no file"):
        prepare_corpus(_cfg(sources=[{"kind": "files", "glob": "books/*.txt"}]), raw, tmp_path / "out2")


def _book(n_chars: int, seed: int = 0) -> str:
    """Distinct paragraphs of random words (no two pieces are near-duplicates)."""
    rng = random.Random(seed)
    words = [w for t in TOPICS for w in (t, t[:-1] + "ing", t.upper()[:3] + "x")] + ["the", "a", "of", "and"]
    paragraphs, size = [], 0
    while size < n_chars:
        paragraph = " ".join(" ".join(rng.choices(words, k=12)) + "." for _ in range(6))
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def test_long_documents_are_split_not_dropped_by_default(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    book = _book(1_300_000)  # a 1.3 MB book: over the default clean.max_chars (1,000,000)
    (raw / "book.txt").write_text(book)
    (raw / "notes.jsonl").write_text(json.dumps({"text": _doc(1)}) + "\n")
    cfg = from_dict(PrepareConfig, {"sources": [{"kind": "files"}]}, "prepare")  # default clean and quality
    metrics = prepare_corpus(cfg, raw, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    pieces = [r for r in rows if r["source"] == "file:book.txt"]
    assert metrics["dropped"] == {} and len(pieces) == 2 and all(len(r["text"]) <= 1_000_000 for r in pieces)
    assert "\n\n".join(r["text"] for r in pieces) == book
    assert {origin_id(r["id"]) for r in pieces} == {content_id(book)} and len({r["split"] for r in pieces}) == 1
    assert metrics["long_documents_split"] == {"documents": 1, "pieces": 2}
    assert [r["id"] for r in rows if r["source"] == "file:notes.jsonl"] == [content_id(_doc(1))]
    # with too_long: drop the book is dropped, and counted
    metrics = prepare_corpus(_cfg(clean={"too_long": "drop"}), raw, tmp_path / "drop")
    assert metrics["dropped"] == {"too_long": 1} and metrics["documents_out"] == 1


def test_file_over_max_record_bytes_is_read_in_pieces_and_kept(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    book = _book(300_000, seed=1)
    (raw / "big.txt").write_text(book)
    metrics = prepare_corpus(_cfg(max_record_bytes=64 << 10, clean={"max_chars": 20_000}), raw, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert metrics["dropped"] == {} and len(rows) >= 15 and all(len(r["text"]) <= 20_000 for r in rows)
    assert len({origin_id(r["id"]) for r in rows}) == 1 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["split"] for r in rows}) == 1
    assert sorted(" ".join(r["text"].split()) for r in rows) == sorted(
        " ".join(p.split()) for p in _pieces_of(book, rows)
    )
    assert metrics["long_documents_split"]["documents"] == 1
    (raw / "small.txt").write_text(_doc(2))
    metrics = prepare_corpus(_cfg(max_record_bytes=64 << 10, clean={"too_long": "drop"}), raw, tmp_path / "drop")
    assert metrics["dropped"] == {"too_long": 5} and metrics["documents_out"] == 1  # the 64 KiB pieces of big.txt


def _pieces_of(book: str, rows: list[dict]) -> list[str]:
    """The book's words, cut where the rows were cut (so the comparison checks nothing was lost or repeated)."""
    words = book.split()
    out, pos = [], 0
    for row in sorted(rows, key=lambda r: r["id"]):
        n = len(row["text"].split())
        out.append(" ".join(words[pos : pos + n]))
        pos += n
    assert pos == len(words)
    return out


def test_source_without_text_field_fails_instead_of_training_on_builtin_alone(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "mine.jsonl").write_text(json.dumps({"content": _doc(1)}) + "\n")
    cfg = _cfg(sources=[{"kind": "builtin", "max_documents": 3}, {"kind": "files", "glob": "*.jsonl"}])
    with pytest.raises(SourceError, match=r"prepare.sources\[1\].*text_field 'text'.*keys \['content'\]"):
        prepare_corpus(cfg, raw, tmp_path / "out")


def test_dangling_symlink_in_raw_is_named(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.txt").write_text(_doc(1))
    (raw / "sub" / "gone.txt").symlink_to(tmp_path / "deleted.txt")
    with pytest.raises(RawDataError, match=f"{raw / 'sub' / 'gone.txt'} -> {tmp_path / 'deleted.txt'}"):
        prepare_corpus(_cfg(), raw, tmp_path / "out")


def test_langid_tags_and_filters(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "en.txt").write_text(_doc(1))
    (raw / "es.txt").write_text(
        "El analizador lee un módulo y devuelve su árbol de sintaxis abstracta para las fases siguientes. " * 3
    )
    metrics = prepare_corpus(_cfg(langid={"enabled": True, "keep": ["en"]}), raw, tmp_path / "out")
    assert [r["lang"] for r in _rows(tmp_path / "out")] == ["en"] and metrics["dropped"] == {"language": 1}
    prepare_corpus(_cfg(langid={"enabled": True}), raw, tmp_path / "all")
    assert sorted(r["lang"] for r in _rows(tmp_path / "all")) == ["en", "es"]


def test_config_validation():
    with pytest.raises(ConfigError, match=r"prepare.sources\[0\].kind"):
        from_dict(PrepareConfig, {"sources": [{"kind": "ftp"}]}, "prepare")
    with pytest.raises(ConfigError, match="needs `name`"):
        from_dict(PrepareConfig, {"sources": [{"kind": "hf"}]}, "prepare")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(PrepareConfig, {"dedupe": {}}, "prepare")
    with pytest.raises(ConfigError, match="val_fraction"):
        from_dict(PrepareConfig, {"split": {"val_fraction": 1.0}}, "prepare")


def test_builtin_subset_through_prepare(tmp_path):
    cfg = _cfg(sources=[{"kind": "builtin", "max_documents": 12}], clean={"min_chars": 200})
    metrics = prepare_corpus(cfg, tmp_path, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert metrics["documents_in"] == 12 and 0 < len(rows) <= 12
    assert all(r["source"].startswith("builtin:python-docs/") and r["lang"] == "en" for r in rows)
    assert metrics["builtin"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_builtin_corpus_is_deterministic_and_has_no_import_side_effects():
    """In a fresh interpreter: nothing printed, no pure-Python module imported, same documents twice."""
    code = (
        "import sys, hashlib\n"
        "from gpt.data.builtin import iter_builtin_documents, BuiltinStats\n"
        "s = BuiltinStats(); docs = list(iter_builtin_documents(s))\n"
        "again = list(iter_builtin_documents())\n"
        "bad = [m for m in ('this', 'antigravity', 'tkinter', 'turtle', 'idlelib', 'readline') if m in sys.modules]\n"
        "sys.stderr.write(repr((len(docs), docs == again, bad, s.modules, s.topics,"
        " sum(len(t) for _, t in docs))))\n"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    n_docs, same, imported, modules, topics, chars = eval(res.stderr.strip().splitlines()[-1])
    assert same and imported == []
    assert n_docs > 300 and modules > 200 and topics > 50 and chars > 1_000_000


def test_builtin_stats_count_sources():
    stats = BuiltinStats()
    docs = []
    for doc in iter_builtin_documents(stats):
        docs.append(doc)
        if len(docs) == 5:
            break
    assert stats.modules == 5 and [s for s, _ in docs] == sorted(s for s, _ in docs)
