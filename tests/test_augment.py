"""Augment pipeline with fake backends: selection, leakage guard, provenance, cache re-runs, failure accounting,
copy-through when disabled, and params validation. Real backends: tests/test_augment_{apertium,dictionary,marian}.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa
import pytest

from gpt.augment import AugmentConfig, TranslationError, augment_corpus
from gpt.augment.cache import TranslationCache
from gpt.augment.pipeline import AUGMENTED_SCHEMA, AugmentFailed, is_selected
from gpt.config import ConfigError, from_dict
from gpt.data.corpus import CorpusWriter, read_corpus


class FakeTranslator:
    """Upper-cases text (a visible, deterministic 'translation'); fails on texts containing a trigger word."""

    name = "fake"
    version = "1"
    parallel = True

    def __init__(self, model: str = "up", fail_on: str | None = None, fail_times: int | None = None):
        self.model = model
        self.fail_on = fail_on
        self.fail_times = fail_times  # None: always fail on the trigger; n: fail only the first n calls that see it
        self.calls: list[list[str]] = []

    def translate(self, texts: Sequence[str]) -> list[str]:
        self.calls.append(list(texts))
        if self.fail_on and any(self.fail_on in t for t in texts):
            if self.fail_times is None or self.fail_times > 0:
                if self.fail_times is not None:
                    self.fail_times -= 1
                raise TranslationError("fake_error", "trigger word")
        return [t.upper() if self.model == "up" else t.lower() for t in texts]

    @property
    def translated(self) -> list[str]:
        return [t for call in self.calls for t in call]


def doc(i: int, split: str = "train", lang: str = "en", text: str | None = None) -> dict:
    text = text if text is not None else f"document number {i}.\n\nsecond paragraph of {i}."
    return {"id": hashlib.sha256(text.encode()).hexdigest()[:16], "text": text, "source": "test", "lang": lang,
            "split": split}


def write_corpus(path, rows):
    with CorpusWriter(path, rows_per_file=7) as writer:  # several parts, to exercise multi-part reading
        writer.write(rows)


def read_rows(path) -> list[dict]:
    return pa.Table.from_batches(list(read_corpus(path))).to_pylist()


def run(tmp_path, rows, translators, **overrides):
    write_corpus(tmp_path / "cleaned", rows)
    cfg = AugmentConfig(**{"backend": "apertium", "fraction": 1.0, "workers": 2, "retries": 1, "detect_lang": False,
                           **overrides})
    metrics = augment_corpus(cfg, tmp_path / "cleaned", tmp_path / "aug", tmp_path / "cache", translators=translators,
                             progress=False)
    return metrics, read_rows(tmp_path / "aug")


def test_originals_kept_and_translations_have_provenance(tmp_path):
    rows = [doc(i) for i in range(20)]
    metrics, out = run(tmp_path, rows, [FakeTranslator()])
    originals = [r for r in out if r["origin_id"] is None]
    assert [{k: r[k] for k in rows[0]} for r in originals] == rows
    added = [r for r in out if r["origin_id"] is not None]
    by_origin = {r["id"]: r for r in rows}
    assert len(added) == 20 == metrics["documents_translated"]
    for r in added:
        assert r["text"] == by_origin[r["origin_id"]]["text"].upper()
        assert (r["lang"], r["split"], r["src_lang"], r["tgt_lang"]) == ("es", "train", "en", "es")
        assert (r["mt_backend"], r["mt_model"], r["mt_mode"]) == ("fake", "up", "translate")
    assert len({r["id"] for r in out}) == len(out)  # new ids are unique and differ from the originals
    assert metrics["documents_out"] == len(out) == 40


def test_translated_ids_are_stable_across_runs(tmp_path):
    rows = [doc(i) for i in range(5)]
    _, first = run(tmp_path, rows, [FakeTranslator()])
    _, again = run(tmp_path, rows, [FakeTranslator()])
    assert first == again


def test_leakage_guard(tmp_path):
    val = [doc(i, split="val") for i in range(10)]
    # a train document whose "translation" (upper-case) equals a validation text must not enter training
    collide = doc(100, text=val[0]["text"].lower()) | {"text": val[0]["text"].lower()}
    val[0]["text"] = val[0]["text"].upper()
    rows = [doc(i) for i in range(10, 30)] + val + [collide]
    fake = FakeTranslator()
    metrics, out = run(tmp_path, rows, [fake])
    val_ids = {r["id"] for r in val}
    assert not any(t in {r["text"] for r in val} for t in fake.translated)  # no val text was ever sent
    assert [r for r in out if r["split"] == "val"] == [r | {k: None for k in AUGMENTED_SCHEMA.names[5:]} for r in val]
    added = [r for r in out if r["origin_id"] is not None]
    assert all(r["split"] == "train" and r["origin_id"] not in val_ids for r in added)
    assert not {r["text"] for r in added} & {r["text"] for r in val}
    assert metrics["dropped_val_collision"] == 1 and metrics["documents_val"] == 10


def test_selection_is_deterministic_fraction_and_language(tmp_path):
    ids = [f"doc-{i}" for i in range(4000)]
    chosen = [i for i in ids if is_selected(i, 0.25, seed=0)]
    assert 0.22 < len(chosen) / len(ids) < 0.28
    assert chosen == [i for i in ids[::-1] if is_selected(i, 0.25, seed=0)][::-1]  # order-independent
    assert set(chosen) != {i for i in ids if is_selected(i, 0.25, seed=1)}
    assert {i for i in ids if is_selected(i, 0.1, 0)} <= set(chosen)  # growing the fraction only adds documents

    rows = [doc(i) for i in range(40)] + [doc(i, lang="id") for i in range(40, 60)]
    fake = FakeTranslator()
    metrics, out = run(tmp_path, rows, [fake], fraction=0.5)
    expected = [r["text"] for r in rows if r["lang"] == "en" and is_selected(r["id"], 0.5, 0)]
    assert fake.translated == expected and metrics["documents_selected"] == len(expected)
    metrics, _ = run(tmp_path, rows, [FakeTranslator()], fraction=1.0, select_langs=["id"])
    assert metrics["documents_selected"] == 20


def test_rerun_hits_cache_and_translates_only_new_documents(tmp_path):
    rows = [doc(i) for i in range(12)]
    first, out1 = run(tmp_path, rows, [FakeTranslator()])
    assert first["cache_misses"] == 12
    again = FakeTranslator()
    second, out2 = run(tmp_path, rows, [again])
    assert again.calls == [] and second["cache_hits"] == 12 and second["documents_sent"] == 0
    assert out1 == out2
    grown = FakeTranslator()
    third, _ = run(tmp_path, rows + [doc(99)], [grown])
    assert grown.translated == [doc(99)["text"]] and third["cache_hits"] == 12
    other_model = FakeTranslator(model="down")  # another model never reuses these entries
    run(tmp_path, rows, [other_model])
    assert len(other_model.translated) == 12
    with TranslationCache(tmp_path / "cache") as cache:
        assert len(cache) == 25
    assert (tmp_path / "cache" / ".gitignore").read_text().splitlines()[-1] == "*"


def test_failures_are_retried_then_counted_and_kept_untranslated(tmp_path):
    rows = [doc(i) for i in range(30)] + [doc(50, text="this one will FAIL always")]
    fake = FakeTranslator(fail_on="FAIL")
    metrics, out = run(tmp_path, rows, [fake], batch_size=8, max_failure_fraction=0.1)
    assert metrics["documents_failed"] == 1 and metrics["failures_by_reason"] == {"fake_error": 1}
    assert metrics["documents_translated"] == 30
    assert fake.translated.count(rows[-1]["text"]) == 2 + 2  # batch: 1 try + 1 retry, alone: 1 try + 1 retry
    assert rows[-1] in [{k: r[k] for k in rows[0]} for r in out]  # kept, untranslated
    with TranslationCache(tmp_path / "cache") as cache:
        assert len(cache) == 30  # failures are not cached, so the next run tries them again


def test_transient_failure_recovers_by_retry(tmp_path):
    rows = [doc(i) for i in range(4)] + [doc(9, text="flaky FAIL once")]
    metrics, out = run(tmp_path, rows, [FakeTranslator(fail_on="FAIL", fail_times=1)])
    assert metrics["documents_failed"] == 0 and metrics["documents_translated"] == 5


def test_too_many_failures_fail_the_stage_and_keep_previous_output(tmp_path):
    rows = [doc(i) for i in range(10)]
    run(tmp_path, rows, [FakeTranslator()])
    before = read_rows(tmp_path / "aug")
    bad = rows + [doc(i, text=f"FAIL {i}") for i in range(3)]
    write_corpus(tmp_path / "cleaned", bad)
    cfg = AugmentConfig(fraction=1.0, retries=0, max_failure_fraction=0.2, detect_lang=False)
    with pytest.raises(AugmentFailed) as err:
        augment_corpus(cfg, tmp_path / "cleaned", tmp_path / "aug", tmp_path / "cache",
                       translators=[FakeTranslator(fail_on="FAIL")], progress=False)
    message = str(err.value)
    # counted over all 13 documents to translate (10 were cache hits), each failed one named by id
    assert "3 of 13 documents" in message and "max_failure_fraction=0.2" in message
    assert all(r["id"] in message for r in bad[10:]) and "was not written" in message
    assert "previous output is kept" not in message  # DVC deletes outputs before a stage runs
    assert "\n" not in message
    assert read_rows(tmp_path / "aug") == before  # outside DVC the old output is still there


def test_failure_threshold_counts_all_documents_so_a_rerun_decides_the_same(tmp_path):
    """2 of 40 fail (5%): the first run passes; the rerun (38 cache hits) must too, with the same output."""
    rows = [doc(i) for i in range(38)] + [doc(90 + i, text=f"this will FAIL {i}") for i in range(2)]
    fake = FakeTranslator(fail_on="FAIL")
    first, out1 = run(tmp_path, rows, [fake], max_failure_fraction=0.05)
    failed_ids = [r["id"] for r in rows[-2:]]
    assert first["documents_failed"] == 2 and first["documents_to_translate"] == 40
    assert [d["id"] for d in first["failed_documents"]] == failed_ids
    assert {d["reason"] for d in first["failed_documents"]} == {"fake_error"}
    again = FakeTranslator(fail_on="FAIL")
    second, out2 = run(tmp_path, rows, [again], max_failure_fraction=0.05)
    assert out2 == out1 and again.calls == []  # cached failures are not resent
    assert second["cache_hits"] == 38 and second["cached_failures"] == 2
    assert [d["id"] for d in second["failed_documents"]] == failed_ids
    with pytest.raises(AugmentFailed, match="2 of 40 documents"):
        run(tmp_path, rows, [FakeTranslator(fail_on="FAIL")], max_failure_fraction=0.04)
    healed = FakeTranslator()  # the backend got fixed: retry_failed sends only the failed ones again
    third, _ = run(tmp_path, rows, [healed], retry_failed=True)
    assert healed.translated == [r["text"] for r in rows[-2:]] and third["documents_failed"] == 0
    fourth, _ = run(tmp_path, rows, [FakeTranslator(fail_on="FAIL")])  # and their translations now are cached
    assert fourth["cache_hits"] == 40 and fourth["documents_failed"] == 0


def test_batch_size_is_part_of_the_cache_key(tmp_path):
    rows = [doc(i) for i in range(6)]
    run(tmp_path, rows, [FakeTranslator()], batch_size=4)
    same = FakeTranslator()
    run(tmp_path, rows, [same], batch_size=4)
    other = FakeTranslator()
    metrics, _ = run(tmp_path, rows, [other], batch_size=2)  # apertium translates differently in other batches
    assert same.calls == [] and len(other.translated) == 6 and metrics["cache_hits"] == 0


def test_backtranslate_chains_two_cached_steps(tmp_path):
    rows = [doc(i) for i in range(6)]
    metrics, out = run(tmp_path, rows, [FakeTranslator("up"), FakeTranslator("down")], mode="backtranslate")
    added = [r for r in out if r["origin_id"]]
    assert [r["text"] for r in added] == [r["text"].lower() for r in rows]
    assert all(r["lang"] == "en" and r["mt_mode"] == "backtranslate" for r in added)
    # both legs' models are recorded: the way there and the way back
    assert {(r["mt_model"], r["mt_model_back"]) for r in added} == {("up", "down")}
    assert [b["model"] for b in metrics["backends"]] == ["up", "down"]
    forward = FakeTranslator("up")
    _, translated = run(tmp_path, rows, [forward])  # translate mode reuses the cached forward step
    assert forward.calls == []
    assert all(r["mt_model_back"] is None for r in translated if r["origin_id"])
    assert not {r["id"] for r in added} & {r["id"] for r in translated}


SPANISH = "La casa es muy grande y mi hermano lee un libro en el jardín todos los días de la semana."
INDONESIAN = "Rumah itu sangat besar dan adik saya membaca buku di taman setiap hari dalam seminggu."
ENGLISH = "The house is very big and my brother reads a book in the garden every day of the week."


def test_untagged_documents_are_selected_by_detected_language(tmp_path):
    """Rows tagged `en` only by default (source of unknown language): langid decides; other languages are
    skipped and counted. The built-in corpus is known English and is not checked."""
    rows = [doc(0, text=ENGLISH), doc(1, text=SPANISH), doc(2, text=INDONESIAN),
            doc(3, text=f"{SPANISH}\n\n>>> print('code does not count')\n")]
    trusted = doc(4, text=INDONESIAN + " Builtin.") | {"source": "builtin:python-docs/x"}
    fake = FakeTranslator()
    metrics, out = run(tmp_path, rows + [trusted], [fake], detect_lang=True)
    assert fake.translated == [ENGLISH, trusted["text"]]
    assert metrics["documents_selected"] == 5 and metrics["documents_skipped_lang"] == 3
    assert metrics["skipped_lang_by_detected"] == {"es": 2, "id": 1} and metrics["documents_to_translate"] == 2
    assert len(out) == 7
    trusting, _ = run(tmp_path, rows, [FakeTranslator()], detect_lang=False)  # trust the tags
    assert trusting["documents_to_translate"] == 4 and trusting["documents_skipped_lang"] == 0


@pytest.mark.parametrize("override", [{"enabled": False}, {"backend": "none"}])
def test_disabled_copies_corpus_through(tmp_path, override):
    rows = [doc(i) for i in range(9)] + [doc(i, split="val") for i in range(9, 12)]
    write_corpus(tmp_path / "cleaned", rows)
    cfg = AugmentConfig(**override)
    metrics = augment_corpus(cfg, tmp_path / "cleaned", tmp_path / "aug", tmp_path / "cache", progress=False)
    out = read_rows(tmp_path / "aug")
    assert out == [r | dict.fromkeys(AUGMENTED_SCHEMA.names[5:]) for r in rows]
    assert metrics["documents_translated"] == 0 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"fraction": 1.5}, "augment.fraction"),
        ({"backend": "google"}, "augment.backend"),
        ({"mode": "paraphrase"}, "augment.mode"),
        ({"batch_size": 0}, "augment.batch_size"),
        ({"workers": 0}, "augment.workers"),
        ({"tgt_lang": "en"}, "augment.tgt_lang"),
        ({"max_failure_fraction": 2.0}, "augment.max_failure_fraction"),
        ({"fraction": "1e-1"}, "augment.fraction"),
        ({"marian": {"model": ""}}, "augment.marian.model"),
        ({"detect_lang": "yes"}, "augment.detect_lang"),
        ({"marian": {"model": "x", "num_beams": 0}}, "augment.marian.num_beams"),
        ({"marian": {"device": "gpu"}}, "augment.marian.device"),
        ({"backend": "marian", "mode": "backtranslate", "marian": {"model": "x"}}, "augment.mode"),
        ({"src_lang": "english language"}, "augment.src_lang"),
        ({"apertium": {"pair": "not a pair"}}, "augment.apertium.pair"),
        ({"apertium": {"pairs": "eng-spa"}}, "augment.apertium: unknown key"),
        ({"translator": "apertium"}, "augment: unknown key"),
    ],
)
def test_bad_params_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(AugmentConfig, section, "augment")
