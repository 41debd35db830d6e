"""Questions about documented Python functions, classes and modules, answered from their own docstrings.

The built-in corpus (gpt/data/builtin.py) writes one document per standard-library module: sections joined by a
blank line, each headed by one line naming what it documents —

    Module textwrap                    the module's docstring follows
    class textwrap.TextWrapper(...)    a class
    textwrap.dedent(text)              a function or method (C modules: the name alone, `math.cos`)

`doc_entries` finds those header lines: a line after a blank line (or the document's start) that is the module's
own dotted name plus a signature or nothing. Requiring the module's name (from the row's `source`) keeps ordinary
docstring lines that merely mention a call from being taken for headers. The answer is the docstring's first
sentence(s) (`summary`); entries whose summary is missing, very short, very long or code are left out, and so are
private names (`_x`), which document internals rather than what a user calls.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from gpt.data.builtin import SOURCE_PREFIX

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_HEADER = re.compile(rf"^(?:(?P<cls>class) )?(?P<name>{_NAME})(?P<sig>\(.*\))?$")
_MODULE_HEADER = re.compile(rf"^Module (?P<name>{_NAME})$")
_SIGNATURE_LINE = re.compile(rf"^{_NAME}\(.*\)(?:\s*->.*)?$")  # C docstrings often open with their signature
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")
MIN_SUMMARY_CHARS = 12

QUESTIONS = {
    "function": ("What does `{name}` do?", "Explain `{name}` in one sentence.", "What is `{name}` used for?",
                 "Briefly, what does `{name}` do?"),
    "class": ("What is the `{name}` class?", "What is `{name}` for?", "Describe the class `{name}` briefly."),
    "module": ("What is the `{name}` module for?", "What does the Python module `{name}` provide?",
               "Describe the `{name}` module in one sentence."),
}


@dataclasses.dataclass(frozen=True)
class DocEntry:
    name: str  # dotted: textwrap.dedent
    kind: str  # function | class | module
    doc: str  # the docstring as the corpus holds it


def module_of(source: str) -> str | None:
    """`builtin:python-docs/textwrap` → `textwrap`; None for other sources (user files, help topics)."""
    prefix = f"{SOURCE_PREFIX}/"
    if not source.startswith(prefix):
        return None
    name = source[len(prefix):]
    return name if re.fullmatch(_NAME, name) else None


def _header(line: str, module: str) -> tuple[str, str] | None:
    """(name, kind) when `line` heads a section of `module`'s document."""
    match = _MODULE_HEADER.match(line)
    if match:
        return (match["name"], "module") if match["name"] == module else None
    match = _HEADER.match(line)
    if not match or not match["name"].startswith(f"{module}."):
        return None
    return match["name"], "class" if match["cls"] else "function"


def doc_entries(text: str, module: str) -> Iterator[DocEntry]:
    """The documented names of one built-in corpus document, each with its docstring, in document order."""
    current: tuple[str, str] | None = None
    body: list[str] = []
    previous_blank = True
    for line in text.split("\n"):
        found = _header(line, module) if previous_blank else None
        if found:
            if current:
                yield DocEntry(current[0], current[1], "\n".join(body).strip())
            current, body = found, []
        else:
            body.append(line)
        previous_blank = not line.strip()
    if current:
        yield DocEntry(current[0], current[1], "\n".join(body).strip())


def summary(doc: str, max_chars: int) -> str | None:
    """The docstring's first sentence (two when the first is very short), on one line; None when unusable."""
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if paragraphs and _SIGNATURE_LINE.match(" ".join(paragraphs[0].split())) and len(paragraphs) > 1:
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    first = paragraphs[0]
    if first.startswith((" ", "\t")) or ">>>" in first:
        return None  # code or an indented table, not prose
    text = " ".join(first.split())
    # C docstrings may open with a signature sentence ("D.clear() -> None. Remove all items from D.")
    sentences = [s for s in _SENTENCE_END.split(text) if "->" not in s]
    if not sentences:
        return None
    answer = sentences[0]
    if len(answer) < 40 and len(sentences) > 1:
        answer = f"{answer} {sentences[1]}"
    if not MIN_SUMMARY_CHARS <= len(answer) <= max_chars or len(answer.split()) < 3:
        return None
    if not re.match(r"[A-Za-z`'\"]", answer):  # "(typ, [data]) = ...", "**DEPRECATED**": not prose
        return None
    return answer if answer[-1] in ".!?" else answer + "."


def is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def question(entry: DocEntry, choice: int) -> str:
    templates = QUESTIONS[entry.kind]
    return templates[choice % len(templates)].format(name=entry.name)
