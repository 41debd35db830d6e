"""Document cleaning for `prepare`: normalization, whitespace/control cleanup, PII scrubbing, quality filters and
the splitting of long documents.

`clean_text` repairs a text (each step switchable in `CleanConfig`); `quality_problem` returns the reason a cleaned
document should be dropped, or None; `split_long_text` cuts a document longer than `max_chars` into pieces at
paragraph, then line, then sentence boundaries. All are pure functions of (text, config), so results never depend
on order or on other documents; deduplication, which does, lives in `gpt.data.dedup`.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from typing import Literal

from gpt.config import ConfigError

# C0/C1 control characters except tab and newline, plus DEL (a run of them between two word characters becomes one
# space: "with\x00embedded" is two words, not "withembedded").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]+")
_NUL = re.compile(r"\x00+")
# Terminal colour/cursor codes pasted from logs: CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \\), and the
# two-byte ESC sequences. Removed whole, before the bare ESC would be.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
# Invisible characters with no meaning in running text: zero-width space, word joiner, zero-width no-break space
# (a BOM in mid-text), Mongolian vowel separator. Zero-width (non-)joiners U+200C/U+200D are kept on purpose:
# Persian, Indic scripts and emoji sequences need them to spell words correctly.
_ZERO_WIDTH = re.compile(r"[\u200b\u2060\ufeff\u180e]")
_LINE_SEPARATORS = re.compile(r"[\u2028\u2029\x85]")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Phone numbers: optional +country code, then 3-3-4 or (3) 3-4 digit groups with separators (not bare digit runs).
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """Heuristic filters (0 or null disables one)."""

    min_alpha_ratio: float = 0.4  # letters / non-whitespace characters
    max_repeated_line_ratio: float = 0.5  # non-empty lines repeating an earlier line / non-empty lines
    max_replacement_ratio: float = 0.01  # U+FFFD (from invalid UTF-8) / characters
    max_line_chars: int = 20_000  # one line longer than this is minified code or binary junk

    def __post_init__(self) -> None:
        for key in ("min_alpha_ratio", "max_repeated_line_ratio", "max_replacement_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"prepare.quality.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.max_line_chars < 0:
            raise ConfigError(f"prepare.quality.max_line_chars: must be >= 0 (0 = off), got {self.max_line_chars}")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    clean_whitespace: bool = True  # control chars, line separators, trailing spaces, 3+ blank lines
    scrub_pii: bool = False  # emails -> <email>, phone numbers -> <phone>
    min_chars: int = 200
    max_chars: int = 1_000_000
    # A document longer than max_chars: split it at paragraph/line/sentence boundaries into pieces of at most
    # max_chars (each its own document, sharing an origin id), or drop it (counted as too_long).
    too_long: Literal["split", "drop"] = "split"

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < max(1, self.min_chars):
            raise ConfigError(
                "prepare.clean.min_chars/max_chars: need 0 <= min_chars <= max_chars, "
                f"got {self.min_chars}, {self.max_chars}"
            )


def _space_between_words(match: re.Match) -> str:
    text, start, end = match.string, match.start(), match.end()
    between_words = 0 < start and end < len(text) and text[start - 1].isalnum() and text[end].isalnum()
    return " " if between_words else ""


def remove_control_chars(text: str, nul_only: bool = False) -> str:
    """Drop control characters (only NUL with `nul_only`); a run of them between two letters/digits becomes a space."""
    return (_NUL if nul_only else _CONTROL).sub(_space_between_words, text)


def clean_text(text: str, cfg: CleanConfig, repairs: Counter | None = None) -> str:
    """Apply the enabled repairs; `repairs` counts documents changed by each step."""
    repairs = repairs if repairs is not None else Counter()
    if cfg.normalize != "none":
        normalized = unicodedata.normalize(cfg.normalize, text)
        if normalized != text:
            repairs[f"unicode_{cfg.normalize.lower()}"] += 1
            text = normalized
    if cfg.clean_whitespace:
        cleaned = _LINE_SEPARATORS.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
        for name, pattern in (("ansi_escapes_removed", _ANSI), ("zero_width_removed", _ZERO_WIDTH)):
            stripped = pattern.sub("", cleaned)
            if stripped != cleaned:
                repairs[name] += 1
                cleaned = stripped
        stripped = remove_control_chars(cleaned)
        if stripped != cleaned:
            repairs["control_chars_removed"] += 1
            cleaned = stripped
        spaced = _MANY_BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("\n", cleaned + "\n")).strip()
        if spaced != cleaned:
            repairs["whitespace_trimmed"] += 1
        text = spaced
    if cfg.scrub_pii:
        text, emails = _EMAIL.subn("<email>", text)
        text, phones = _PHONE.subn("<phone>", text)
        repairs["pii_email"] += emails
        repairs["pii_phone"] += phones
    return text


def quality_problem(text: str, cfg: CleanConfig, q: QualityConfig) -> str | None:
    """The reason to drop a cleaned document (a metrics key), or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"  # only reached with too_long: drop (prepare splits long documents first otherwise)
    if q.max_replacement_ratio < 1.0 and text.count("\ufffd") > q.max_replacement_ratio * len(text):
        return "invalid_utf8"
    lines = text.split("\n")
    if q.max_line_chars and max(len(line) for line in lines) > q.max_line_chars:
        return "line_too_long"
    if q.min_alpha_ratio > 0.0:
        visible = len(text) - sum(text.count(c) for c in " \n\t")
        letters = sum(1 for c in text if c.isalpha())
        if visible and letters / visible < q.min_alpha_ratio:
            return "low_alpha_ratio"
    if q.max_repeated_line_ratio < 1.0:
        non_empty = [line.strip() for line in lines if line.strip()]
        if len(non_empty) >= 4:
            repeated = len(non_empty) - len(set(non_empty))
            if repeated > q.max_repeated_line_ratio * len(non_empty):
                return "repeated_lines"
    return None


# Boundaries to cut a long document at, best first: a blank line, a line end, the end of a sentence, any space.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?;:\u3002\uff01\uff1f])\s+"),
    re.compile(r"\s+"),
)


def _spans(text: str, start: int, end: int, limit: int, level: int) -> list[tuple[int, int]]:
    """text[start:end] as consecutive (start, end) spans of at most `limit` characters, cut at the best boundary
    that makes them fit; the boundary characters fall between spans."""
    if end - start <= limit:
        return [(start, end)]
    if level == len(_BOUNDARIES):  # no space at all in `limit` characters: cut anywhere, in equal parts
        step = -(-(end - start) // -(-(end - start) // limit))
        return [(i, min(i + step, end)) for i in range(start, end, step)]
    spans, pos = [], start
    for match in _BOUNDARIES[level].finditer(text, start, end):
        if match.start() > pos:
            spans += _spans(text, pos, match.start(), limit, level + 1)
        pos = match.end()
    if pos < end:
        spans += _spans(text, pos, end, limit, level + 1)
    return spans


def split_long_text(text: str, max_chars: int) -> list[str]:
    """`text` as pieces of at most `max_chars` characters, cut at paragraph, else line, else sentence, else word
    boundaries. Pieces aim at equal sizes (no tiny remainder) and keep the text between their cuts verbatim."""
    if len(text) <= max_chars:
        return [text]
    spans = _spans(text, 0, len(text), max_chars, 0)
    target = -(-len(text) // -(-len(text) // max_chars))  # ceil(len / number of pieces needed)
    pieces, first = [], spans[0][0]
    for (_, end), following in zip(spans, spans[1:] + [None]):
        if following is None or end - first >= target or following[1] - first > max_chars:
            pieces.append(text[first:end])
            first = following[0] if following else end
    return pieces
