"""Code detection for translation (gpt/augment/protect.py): what is code, what stays prose, and that the
segments always join back to the exact input. The real backends are tested keeping code byte-identical in
tests/test_augment_{apertium,dictionary}.py."""

from __future__ import annotations

import random

import pytest

from gpt.augment.protect import split_code, translate_prose

DOC = """Intro with `inline = code`, ``double``, :func:`os.path.join` and a lone ` backtick.

The `name` attribute::

>>> v.name
'pyepat.abc'
>>> for x in range(2):
...     print(x)
0
1

Some prose after.
    not code: no blank line before it
An example:

   async def func(param1, param2):
       do_stuff()

   These methods are called to implement the binary arithmetic
   operations ("+", "-") and are prose, indented like pydoc indents notes.

    delay: amount of time, in seconds, between starting coroutines.

```python
x = [1, 2]

y = 3
```
Grammar:

   for_stmt ::= "for" target_list "in" expression_list ":" suite

Literal::

    make it so

    still the same literal block
Back to prose.
"""


def kinds(text):
    return [(s.kind, s.text) for s in split_code(text)]


def test_code_and_prose_are_told_apart():
    code = [text for kind, text in kinds(DOC) if kind != "prose"]
    assert code == [
        "`inline = code`", "``double``", ":func:`os.path.join`", "`name`",
        ">>> v.name\n'pyepat.abc'\n>>> for x in range(2):\n...     print(x)\n0\n1",
        "   async def func(param1, param2):\n       do_stuff()",
        "```python\nx = [1, 2]\n\ny = 3\n```",
        '   for_stmt ::= "for" target_list "in" expression_list ":" suite',
        "    make it so\n\n    still the same literal block",
    ]
    prose = "".join(text for kind, text in kinds(DOC) if kind == "prose")
    for sentence in ("a lone ` backtick", "not code: no blank line", "These methods are called",
                     "delay: amount of time", "Back to prose."):
        assert sentence in prose


@pytest.mark.parametrize("text", ["", "plain", "```\nunclosed fence\n", ">>> only code", "`a` `b`", "x\r\n>>> y\r\n",
                                  "  \n\n   \n", "``` ``` ```"])
def test_segments_join_back_exactly(text):
    assert "".join(s.text for s in split_code(text)) == text


def test_segments_join_back_on_random_text():
    rng = random.Random(0)
    alphabet = ["`", "``", ">>> ", "... ", "\n", "\n\n", "    ", "   ", "::", "x = 1", "word ", "```", "~~~", "\t", "$ ls"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert "".join(s.text for s in split_code(text)) == text


def test_translate_prose_sends_only_prose_and_keeps_its_whitespace():
    sent = []

    def upper(pieces):
        sent.extend(pieces)
        return [p.upper() for p in pieces]

    out = translate_prose(["Call `f(x)` now.\n\n>>> f(1)\n2\n\n  the end  ", "", "`only`"], upper)
    assert out == ["CALL `f(x)` NOW.\n\n>>> f(1)\n2\n\n  THE END  ", "", "`only`"]
    assert sent == ["Call", "now.", "the end"]
