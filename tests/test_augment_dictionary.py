"""The dictionary backend on a tiny dictd dictionary written by the test (.index + .dict, and .dict.dz)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pytest

from gpt.augment import AugmentConfig, BackendUnavailable, augment_corpus
from gpt.augment.base import apt_packages
from gpt.augment.dictionary import B64, DictionaryTranslator, b64_number, first_sense, load_dictd
from gpt.config import from_dict
from gpt.data.corpus import CorpusWriter, read_corpus

ENTRIES = {  # FreeDict layout: header, then per sense "translations" + gloss
    "00databaseinfo": "tiny test dictionary\n",
    "house": "house /haʊs/ <n>\n1. rumah, balai\nhuman abode\n2. wangsa\ndynasty\n",
    "the": "the /ðə/ <article>\nitu, sang\narticle\n",
    "cat": "cat /kæt/ <n>\nkucing\nanimal\n",
    "big": "big /bɪɡ/ <adj>\nbesar\nlarge\n",
    "ice cream": "ice cream /aɪs kɹiːm/ <n>\nes krim\nfrozen dessert\n",
    "ice": "ice /aɪs/ <n>\nes\nfrozen water\n",
    "run": "run /ɹʌn/ <v>\n1. menjalankan 2.\nto be in charge of\n 3.\nto execute\n",
}


def b64(n: int) -> str:
    digits = ""
    while True:
        digits = B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


def write_dictd(directory: Path, compress: bool) -> Path:
    data, index = b"", []
    for head, body in sorted(ENTRIES.items()):
        raw = body.encode("utf-8")
        index.append(f"{head}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    base = directory / "freedict-eng-ind"
    (directory / "freedict-eng-ind.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    if compress:
        (directory / "freedict-eng-ind.dict.dz").write_bytes(gzip.compress(data))
    else:
        (directory / "freedict-eng-ind.dict").write_bytes(data)
    return base


@pytest.mark.parametrize("compress", [False, True])
def test_load_dictd_reads_first_sense(tmp_path, compress):
    table = load_dictd(write_dictd(tmp_path, compress))
    assert table == {"house": "rumah", "the": "itu", "cat": "kucing", "big": "besar", "ice cream": "es krim",
                     "ice": "es", "run": "menjalankan"}
    assert [b64_number(b64(n)) for n in (0, 63, 64, 4097)] == [0, 63, 64, 4097]
    assert first_sense("x <n>\n") is None


def test_word_by_word_substitution(tmp_path):
    tr = DictionaryTranslator(write_dictd(tmp_path, compress=True))
    out = tr.translate(["The cat likes ice cream.\n\nThe big house, the ice!", ""])
    # unknown words are copied, phrases win over single words, capitals and punctuation and layout are kept
    assert out == ["Itu kucing likes es krim.\n\nItu besar rumah, itu es!", ""]


def test_missing_dictionary_says_what_to_install(tmp_path):
    with pytest.raises(BackendUnavailable, match="dict-freedict-eng-ind"):
        DictionaryTranslator(tmp_path / "freedict-eng-ind")
    if "dict-freedict-eng-ind" in (apt_packages("dict-") or ()):  # apt knows the real package: no invented ones
        with pytest.raises(BackendUnavailable, match="have no package .*dict-freedict-eng-xxx") as err:
            DictionaryTranslator(tmp_path / "freedict-eng-xxx")
        assert "apt-get install" not in str(err.value)


def test_code_is_left_alone(tmp_path):
    tr = DictionaryTranslator(write_dictd(tmp_path, compress=False))
    text = "The cat runs `the cat` here.\n\n>>> the = cat('house')\n'the big house'\n\nThe big house.\n"
    assert tr.translate([text]) == [
        "Itu kucing runs `the cat` here.\n\n>>> the = cat('house')\n'the big house'\n\nItu besar rumah.\n"]


def test_dictionary_backend_in_the_pipeline(tmp_path):
    base = write_dictd(tmp_path, compress=False)
    rows = [{"id": f"d{i}", "text": f"The cat {i}.", "source": "t", "lang": "en", "split": "train"} for i in range(4)]
    with CorpusWriter(tmp_path / "cleaned") as writer:
        writer.write(rows)
    section = {"backend": "dictionary", "tgt_lang": "id", "fraction": 1.0, "dictionary": {"path": str(base)},
               "detect_lang": False}
    cfg = from_dict(AugmentConfig, section, "augment")
    metrics = augment_corpus(cfg, tmp_path / "cleaned", tmp_path / "aug", tmp_path / "cache", progress=False)
    out = pa.Table.from_batches(list(read_corpus(tmp_path / "aug"))).to_pylist()
    added = [r for r in out if r["origin_id"]]
    assert [r["text"] for r in added] == [f"Itu kucing {i}." for i in range(4)]
    assert {(r["lang"], r["mt_backend"], r["mt_model"]) for r in added} == {("id", "dictionary", "freedict-eng-ind")}
    assert metrics["documents_translated"] == 4


@pytest.mark.skipif(not Path("/usr/share/dictd/freedict-eng-ind.index").is_file(),
                    reason="needs `apt-get install dict-freedict-eng-ind` (make system-deps)")
def test_installed_freedict_eng_ind():
    tr = DictionaryTranslator("/usr/share/dictd/freedict-eng-ind")
    assert len(tr.table) > 5000
    out = tr.translate(["The house is big."])[0]
    assert out == "Itu balai is besar."  # first sense of each word; "is" has no entry and is copied
