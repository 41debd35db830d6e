"""Find the code in a document so that translation leaves it alone: it is cut out, the prose is translated, and
the code is put back byte for byte.

What counts as code (measured on the default corpus, whose documents are Python docstrings and pydoc topics):
- doctest blocks: from a `>>>` line to the next blank line (its `...` continuations and its expected output);
- fenced blocks: a line opening with three or more backticks or tildes, to the matching closing fence (or the end);
- indented blocks (after a blank line) that are introduced by a reST literal marker (`::` ending the paragraph
  before), parse as Python, or hold grammar rules (`::=`) or shell prompts (`$ `). Indentation alone does not
  decide: pydoc text indents notes and parameter descriptions (prose) by the same 3-4 spaces as examples, and
  Markdown's "4 spaces = code" rule would freeze most docstrings' argument lists untranslated;
- inline spans in backticks (`` `x` ``, ``` ``x`` ```, with a reST role such as `` :func:`f` ``), within a paragraph.

`split_code` returns the document as consecutive `Segment`s (their texts join back to the input exactly); backends
translate only the `prose` ones. Inline code stays inside its sentence (apertium carries it as a superblank, see
apertium.py); block code separates the prose around it into independently translated pieces.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

_FENCE = re.compile(r"[ ]{0,3}(`{3,}|~{3,})")
_DOCTEST = re.compile(r"[ \t]*>>>(?:[ \t]|$)")
_INDENTED = re.compile(r"(?: {2,}|\t)\S")
_GRAMMAR_OR_SHELL = re.compile(r"::=|^\s*[$%] \S", re.MULTILINE)
# a backtick run, the shortest text up to an equal run, never across a blank line; an optional reST role before it
_INLINE = re.compile(r"(?::[\w.+-]+:)*(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n)[^`]|`(?!\1))+?)(?<!`)\1(?!`)")
_TRIVIAL = (ast.Name, ast.Constant, ast.Attribute)


@dataclass(frozen=True)
class Segment:
    text: str
    kind: Literal["prose", "block", "inline"]

    @property
    def is_code(self) -> bool:
        return self.kind != "prose"


def _blank(line: str) -> bool:
    return not line.strip()


def _looks_like_code(block: str) -> bool:
    """True for grammar rules, shell sessions and anything that parses as Python beyond a bare name or value."""
    if _GRAMMAR_OR_SHELL.search(block):
        return True
    try:
        tree = ast.parse(textwrap.dedent(block))
    except (SyntaxError, ValueError):
        return False
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, _TRIVIAL)) for s in tree.body)


def _fence_end(lines: list[str], start: int) -> int:
    """Index after the closing fence of the block opened at `start` (the end of the text when unclosed)."""
    fence = _FENCE.match(lines[start]).group(1)
    for j in range(start + 1, len(lines)):
        stripped = lines[j].strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            return j + 1
    return len(lines)


def _until_blank(lines: list[str], start: int) -> int:
    end = start + 1
    while end < len(lines) and not _blank(lines[end]):
        end += 1
    return end


def _indented_end(lines: list[str], start: int) -> int:
    """Index after an indented block: lines at least as indented as the first, blank lines inside it included."""
    indent = len(lines[start]) - len(lines[start].lstrip())
    end, last = start + 1, start + 1
    while end < len(lines) and (_blank(lines[end]) or len(lines[end]) - len(lines[end].lstrip()) >= indent):
        if not _blank(lines[end]):
            last = end + 1
        end += 1
    return last


def _previous_text_line(lines: list[str], index: int) -> str:
    for j in range(index - 1, -1, -1):
        if not _blank(lines[j]):
            return lines[j]
    return ""


def _block_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(first, end) line ranges of block code."""
    spans, i = [], 0
    while i < len(lines):
        line = lines[i]
        after_blank = i == 0 or _blank(lines[i - 1])
        if _FENCE.match(line):
            end = _fence_end(lines, i)
        elif _DOCTEST.match(line):
            end = _until_blank(lines, i)
        elif after_blank and _INDENTED.match(line):
            # the whole indented region (blank lines inside included), else its first paragraph alone
            end = _indented_end(lines, i)
            literal = _previous_text_line(lines, i).rstrip().endswith("::")
            if not (literal or _looks_like_code("".join(lines[i:end]))):
                end = _until_blank(lines, i)
                if not _looks_like_code("".join(lines[i:end])):
                    i += 1
                    continue
        else:
            i += 1
            continue
        spans.append((i, end))
        i = end
    return spans


def _split_inline(text: str) -> list[Segment]:
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        if match.start() > pos:
            out.append(Segment(text[pos : match.start()], "prose"))
        out.append(Segment(match.group(0), "inline"))
        pos = match.end()
    if pos < len(text):
        out.append(Segment(text[pos:], "prose"))
    return out


def split_code(text: str) -> list[Segment]:
    """The text as prose / block-code / inline-code segments; `"".join(s.text for s in segments) == text`.

    A block segment holds whole lines without the final line break, which stays in the prose around it.
    """
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    segments: list[Segment] = []
    pos = 0
    for first, end in _block_spans(lines):
        start, stop = offsets[first], offsets[end]
        stop -= len(lines[end - 1]) - len(lines[end - 1].rstrip("\r\n"))
        segments += _split_inline(text[pos:start])
        segments.append(Segment(text[start:stop], "block"))
        pos = stop
    segments += _split_inline(text[pos:])
    return [s for s in segments if s.text]


def translate_prose(texts: Sequence[str], translate: Callable[[list[str]], list[str]]) -> list[str]:
    """Translate only the prose of each text, in one call: every prose segment (without its surrounding
    whitespace, which is kept) goes to `translate`; code segments are copied. For backends that cannot carry
    inline code through a sentence (word-by-word and neural backends), each prose piece is translated alone."""
    pieces: list[str] = []
    plans: list[list[Segment | int]] = []
    for text in texts:
        plan: list[Segment | int] = []
        for seg in split_code(text):
            core = seg.text.strip()
            if seg.is_code or not core:
                plan.append(seg)
                continue
            lead, trail = seg.text[: len(seg.text) - len(seg.text.lstrip())], seg.text[len(seg.text.rstrip()) :]
            plan += [Segment(lead, "prose"), len(pieces), Segment(trail, "prose")]
            pieces.append(core)
        plans.append(plan)
    done = translate(pieces) if pieces else []
    return ["".join(done[p] if isinstance(p, int) else p.text for p in plan) for plan in plans]
