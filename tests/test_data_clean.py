"""Cleaning steps (each switchable), quality filters and deduplication."""

from __future__ import annotations

from collections import Counter

import pytest

from gpt.config import ConfigError, from_dict
from gpt.data.clean import CleanConfig, QualityConfig, clean_text, quality_problem, split_long_text
from gpt.data.dedup import DedupConfig, Deduplicator, content_id

OFF = CleanConfig(normalize="none", clean_whitespace=False, scrub_pii=False)
PROSE = "The parser reads a module and returns its abstract syntax tree for later passes. " * 4
LONG = " ".join(f"Sentence {i} explains how the {w} handles its input." for i, w in enumerate(["parser", "lexer"] * 30))


def test_all_steps_off_is_identity():
    text = "ﬁle\x07 \u2028 a@b.com  \n\n\n\n555-123-4567 e\u0301"
    assert clean_text(text, OFF) == text


def test_normalization_forms():
    decomposed = "cafe\u0301 ﬁle"
    assert clean_text(decomposed, CleanConfig(normalize="NFC", clean_whitespace=False)) == "café ﬁle"
    assert clean_text(decomposed, CleanConfig(normalize="NFKC", clean_whitespace=False)) == "café file"


def test_whitespace_and_control_cleanup():
    repairs = Counter()
    text = "  title\x07\x1b  \r\nline\u2028two\t \n\n\n\n\nend\x85tail  "
    assert clean_text(text, CleanConfig(), repairs) == "title\nline\ntwo\n\nend\ntail"
    assert repairs == Counter(control_chars_removed=1, whitespace_trimmed=1)
    assert clean_text("keep\ttabs\n\n  and indentation", CleanConfig()) == "keep\ttabs\n\n  and indentation"


def test_controls_between_words_become_a_space_ansi_and_zero_width_are_stripped():
    repairs = Counter()
    text = "with\x00embedded\x01\x02words, \x1b[1;31mred\x1b[0m \x1b]0;title\x07log, zero\u200bwidth\ufeff end\x07."
    assert clean_text(text, CleanConfig(), repairs) == "with embedded words, red log, zerowidth end."
    assert repairs == Counter(control_chars_removed=1, ansi_escapes_removed=1, zero_width_removed=1)
    assert clean_text("می\u200cخواهم", CleanConfig()) == "می\u200cخواهم"  # the joiner spells Persian words


def test_long_documents_split_at_paragraph_line_then_sentence_ends():
    paragraphs = [f"Paragraph {i}. " + "Some words here. " * 10 for i in range(30)]
    text = "\n\n".join(paragraphs)
    pieces = split_long_text(text, 1000)
    assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces)
    assert all(p.startswith("Paragraph") and p.endswith("here. ") for p in pieces)  # whole paragraphs
    assert "\n\n".join(pieces) == text
    one_paragraph = "A first sentence that is long enough. " * 100  # no line ends: cut after sentences
    pieces = split_long_text(one_paragraph.strip(), 500)
    assert all(len(p) <= 500 and p.endswith("enough.") for p in pieces) and " ".join(pieces) == one_paragraph.strip()
    assert split_long_text("x" * 2500, 1000) == ["x" * 834, "x" * 834, "x" * 832]  # no space at all: equal parts
    assert split_long_text("short", 1000) == ["short"]


def test_pii_scrub():
    repairs = Counter()
    text = "Mail guido.v+py@python.org or call +1 555-123-4567 / (555) 123-4567; version 3.11.7, 2024-01-01."
    out = clean_text(text, CleanConfig(scrub_pii=True), repairs)
    assert out == "Mail <email> or call <phone> / <phone>; version 3.11.7, 2024-01-01."
    assert repairs["pii_email"] == 1 and repairs["pii_phone"] == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("   \n ", "empty"),
        ("short", "too_short"),
        (PROSE * 100, "too_long"),
        (PROSE + "\ufffd" * 20, "invalid_utf8"),
        (PROSE + "x" * 600, "line_too_long"),
        (PROSE + "\n {}[]()<>=+-*/" * 60, "low_alpha_ratio"),
        (PROSE + "\n" + "same line again\n" * 30, "repeated_lines"),
        (PROSE, None),
    ],
)
def test_quality_reasons(text, reason):
    cfg = CleanConfig(min_chars=100, max_chars=5000)
    assert quality_problem(text, cfg, QualityConfig(max_line_chars=500)) == reason


def test_quality_filters_can_be_disabled():
    off = QualityConfig(min_alpha_ratio=0.0, max_repeated_line_ratio=1.0, max_replacement_ratio=1.0, max_line_chars=0)
    junk = "=+-*/ \ufffd\n" * 100 + "y" * 5000
    assert quality_problem(junk, CleanConfig(min_chars=0), off) is None


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="prepare.quality.min_alpha_ratio"):
        from_dict(QualityConfig, {"min_alpha_ratio": 2.0}, "prepare.quality")
    with pytest.raises(ConfigError, match="prepare.clean.normalize"):
        from_dict(CleanConfig, {"normalize": "NFD"}, "prepare.clean")
    with pytest.raises(ConfigError, match="prepare.clean.too_long"):
        from_dict(CleanConfig, {"too_long": "truncate"}, "prepare.clean")
    with pytest.raises(ConfigError, match="prepare.dedup.threshold"):
        from_dict(DedupConfig, {"threshold": 1.5}, "prepare.dedup")


def test_dedup_exact_near_and_distinct():
    d = Deduplicator(DedupConfig())
    near = LONG.replace("Sentence 7 explains", "Sentence 7 shows", 1)
    other = "An entirely different document about sockets, threads and queues. " * 4
    assert [d.is_duplicate(t) for t in (LONG, LONG, near, other)] == [None, "exact", "near", None]


def test_dedup_switches_and_ids():
    exact_only = Deduplicator(DedupConfig(near=False))
    near = LONG.replace("Sentence 7 explains", "Sentence 7 shows", 1)
    assert [exact_only.is_duplicate(t) for t in (LONG, near, LONG)] == [None, None, "exact"]
    nothing = Deduplicator(DedupConfig(exact=False, near=False))
    assert [nothing.is_duplicate(t) for t in (PROSE, PROSE)] == [None, None]
    assert content_id(PROSE) == content_id(str(PROSE)) and content_id(LONG) != content_id(near)
