"""The apertium backend against the real `apertium` command (CI installs apertium + apertium-eng-spa):
paragraph layout, characters apertium uses as markup, batching with the separator (and its fallback), the
missing-package message, and the `augment` stage end to end on a small corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.augment import BackendUnavailable
from gpt.augment import apertium as ap
from gpt.augment.base import apt_packages
from tests.project_params import write_params

pytestmark = pytest.mark.skipif(
    shutil.which("apertium") is None or "eng-spa" not in ap.installed_pairs(),
    reason="needs `apt-get install apertium apertium-eng-spa` (make system-deps)",
)
ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    "The house is very big.\n\nMy brother reads a book in the garden.\nHe likes it.",
    "  Leading and trailing whitespace stays.\n\n\n\nAfter three blank lines.\n",
    "Markup-like characters: <b>bold</b> [brackets] back\\slash ^caret$ @at *star #hash a/b {braces} 50% & done.",
    "Where is the train station?\n\nThe train leaves at 5 o'clock.",
    "x < y > z and list[0] and C:\\dir\\file and email a@b.com",
]


def plain_apertium(text: str) -> str:
    res = subprocess.run(["apertium", "-u", "eng-spa"], input=text, capture_output=True, text=True, check=True)
    return res.stdout


@pytest.fixture(scope="module")
def translator():
    return ap.ApertiumTranslator("eng-spa")


def test_one_call_for_a_batch_and_layout_preserved(translator):
    calls = translator.stats["process_calls"]
    out = translator.translate(DOCS)
    assert translator.stats["process_calls"] == calls + 1 and translator.stats["batch_fallbacks"] == 0
    assert len(out) == len(DOCS)
    assert out[0].startswith("La casa es muy grande.") and "libro" in out[0]
    for src, dst in zip(DOCS, out):
        assert dst != src
        assert dst.count("\n") == src.count("\n") and dst.count("\n\n") == src.count("\n\n")
        assert len(dst) - len(dst.lstrip()) == len(src) - len(src.lstrip())
        assert len(dst) - len(dst.rstrip()) == len(src) - len(src.rstrip())


UNBALANCED = [
    "unbalanced [ bracket here", "lone ] bracket", "ends with backslash \\", "^caret alone", "dollar $ alone $",
    "<unclosed tag", "tab\tseparated\tcolumns", "emoji 😀 and CJK 漢字", "code: `x = a[i] ^ b`; if (a<b) { return $x; }",
    "line1\r\nline2",
]


def test_markup_characters_survive(translator):
    texts = DOCS + UNBALANCED
    out = translator.translate(texts)
    assert translator.stats["batch_fallbacks"] == 0
    for src, dst in zip(texts, out):
        for ch in "<>[]\\^$@*#/{}%&`\t\r😀漢":
            assert dst.count(ch) == src.count(ch), (ch, src, dst)


def test_single_document_equals_plain_apertium(translator):
    for text in DOCS:
        assert translator.translate([text])[0].strip() == plain_apertium(text).strip()


def test_separator_in_text_and_empty_texts(translator):
    texts = ["", "   ", f"A text that mentions {ap.SEPARATOR} itself.", "The dog sleeps."]
    out = translator.translate(texts)
    assert out[:2] == ["", "   "]
    assert ap.SEPARATOR in out[2] and out[2] != texts[2]
    assert out[3] == translator.translate([texts[3]])[0]


def test_mangled_separator_falls_back_to_one_call_per_document(translator, monkeypatch):
    real_run = translator._run
    monkeypatch.setattr(translator, "_run", lambda text, prefix: real_run(text, prefix).replace(ap.SEPARATOR, "", 1))
    before = dict(translator.stats)
    out = translator.translate(DOCS[:3])
    assert translator.stats["batch_fallbacks"] == before["batch_fallbacks"] + 1
    assert translator.stats["process_calls"] == before["process_calls"] + 1 + 3
    monkeypatch.undo()
    assert out == [translator.translate([d])[0] for d in DOCS[:3]]


def test_missing_program_or_pair_says_what_to_install(monkeypatch):
    with pytest.raises(BackendUnavailable, match=r"apertium-eng-xyz.*augment\.enabled: false"):
        ap.ApertiumTranslator("eng-xyz")
    monkeypatch.setattr(ap.shutil, "which", lambda name: None)
    with pytest.raises(BackendUnavailable, match=r"not installed.*apertium-eng-spa"):
        ap.ApertiumTranslator("eng-spa")


@pytest.mark.skipif("apertium" not in (apt_packages("apertium") or ()), reason="needs apt package lists (apt-get update)")
def test_install_hints_name_packages_debian_has():
    """Debian has no apertium-eng-ind (English-Indonesian has no apertium pair): the hint must not invent one."""
    hint = ap.package_hint("eng-ind")
    assert "apt-get install" not in hint and "no package" in hint
    assert ap.package_hint("spa-eng") == "install it with `sudo apt-get install apertium-eng-spa`"  # reverse order
    assert ap.package_hint("eng-glg").startswith("install it with `sudo apt-get install apertium-")
    with pytest.raises(BackendUnavailable) as err:
        ap.ApertiumTranslator("eng-ind")
    assert "apt-get install apertium-eng-ind" not in str(err.value) and "dictionary" in str(err.value)


MIXED = """The `name` attribute holds the full dotted name, and ``strict`` is checked by :func:`os.path.join`::

>>> from ftplib import FTP
>>> ftp = FTP('ftp.us.debian.org')  # connect to host, default port
>>> print(ftp.login())
'230 Login successful.'

My brother reads a book in the garden. Call `open(path, "w")` to write the file.

   async def func(param1, param2):
       await some_coroutine()  # the house is big

```python
for line in open("file.txt"):
    print(line)  # where is the train station?
```

    if x < y and [z] ^ w["$"]:
        return {"a": 1}

The house is very big.
"""


def test_code_is_kept_byte_identical_and_prose_translated(translator):
    from gpt.augment.protect import split_code

    out = translator.translate([MIXED, "The dog sleeps."])
    code = [s.text for s in split_code(MIXED) if s.is_code]
    assert len(code) == 8
    pos = 0
    for span in code:  # every code span, in order, byte for byte
        found = out[0].find(span, pos)
        assert found >= 0, span
        pos = found + len(span)
    assert "La casa es muy grande." in out[0] and "libro" in out[0] and "jardín" in out[0]
    assert "The house" not in out[0] and out[1] == "Los sueños de perro."
    assert translator.translate(["Use `x = a[i]` here."])[0] == "Uso `x = a[i]` aquí."
    lines = [line for line in MIXED.splitlines() if line.startswith(">>>")]
    assert all(line in out[0].splitlines() for line in lines)


def test_stage_end_to_end(tmp_path):
    """`python -m stages.augment` on a small corpus: default params, then a re-run served from the cache."""
    sys.path.insert(0, str(ROOT))
    from gpt.data.corpus import CorpusWriter

    rows = [{"id": f"d{i}", "text": DOCS[i % len(DOCS)] + f" Number {i}.", "source": "t", "lang": "en",
             "split": "val" if i % 5 == 0 else "train"} for i in range(20)]
    with CorpusWriter(tmp_path / "data/cleaned") as writer:
        writer.write(rows)
    write_params(tmp_path, {"augment": {"backend": "apertium", "fraction": 1.0, "workers": 2}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stages.augment"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "metrics/augment.json").read_text())
    assert metrics["documents_translated"] == 16 and metrics["documents_failed"] == 0
    assert metrics["backends"][0]["model"] == "eng-spa"
    subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    again = json.loads((tmp_path / "metrics/augment.json").read_text())
    assert again["cache_hits"] == 16 and again["documents_sent"] == 0
    write_params(tmp_path, {"augment": {"fraction": 2.0}})
    bad = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "augment.fraction" in bad.stderr


def test_parallel_workers_give_the_same_corpus(tmp_path):
    """Requests are formed before they are spread over workers, so 1 and 2 workers write identical corpora."""
    import pyarrow as pa

    from gpt.augment import AugmentConfig, augment_corpus
    from gpt.data.corpus import CorpusWriter, read_corpus

    rows = [{"id": f"d{i}", "text": f"{DOCS[i % len(DOCS)]}\n\nParagraph {i} is here.", "source": "t", "lang": "en",
             "split": "train"} for i in range(12)]
    with CorpusWriter(tmp_path / "cleaned") as writer:
        writer.write(rows)
    outputs = []
    for workers in (1, 2):
        cfg = AugmentConfig(fraction=1.0, workers=workers, batch_size=3)
        metrics = augment_corpus(cfg, tmp_path / "cleaned", tmp_path / f"aug{workers}", tmp_path / f"cache{workers}",
                                 progress=False)
        assert metrics["backend_requests"] == 4 and metrics["config"]["workers"] == workers
        outputs.append(pa.Table.from_batches(list(read_corpus(tmp_path / f"aug{workers}"))).to_pylist())
    assert outputs[0] == outputs[1] and len(outputs[0]) == 24
