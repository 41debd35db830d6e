"""Document cleaning for `prepare`: normalization, whitespace/control cleanup, PII scrubbing and quality filters.

`clean_text` repairs a text (each step switchable in `CleanConfig`); `quality_problem` returns the reason a cleaned
document should be dropped, or None. Both are pure functions of (text, config), so results never depend on order
or on other documents; deduplication, which does, lives in `gpt.data.dedup`.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from typing import Literal

from gpt.config import ConfigError

# C0/C1 control characters except tab and newline, plus DEL; zero-width/bidi marks are left alone.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
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

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < max(1, self.min_chars):
            raise ConfigError(
                "prepare.clean.min_chars/max_chars: need 0 <= min_chars <= max_chars, "
                f"got {self.min_chars}, {self.max_chars}"
            )


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
        cleaned = _CONTROL.sub("", cleaned)
        if cleaned != text:
            repairs["control_chars_removed"] += 1
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
        return "too_long"
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
