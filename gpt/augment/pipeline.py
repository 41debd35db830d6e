"""The augment stage's logic: select train documents, translate them (cached, retried, in parallel), write
the original corpus plus the translated copies with provenance, and count everything for metrics.

Guarantees:
- Leakage guard: only `split == "train"` documents are selected, translated rows are always `split = "train"`,
  validation rows are copied unchanged, and a translation whose text equals a validation document is dropped
  (counted as `dropped_val_collision`), so neither a validation document nor its translation reaches training.
- Selection is deterministic: a document is chosen when its language is in `select_langs` and
  sha256(seed, id) falls below `fraction` — the same documents on every machine and run, and adding documents
  never changes which of the old ones are chosen.
- Language: unless the source's language is known (the built-in Python docs are English), each selected
  document's language is detected with langid (offline, on its prose) and a document not in `src_lang` is
  skipped and counted (`documents_skipped_lang`): a Spanish text sent through eng→spa comes back a near-copy.
- Code is never translated: doctest, fenced and indented code and inline backtick spans come back byte for
  byte (protect.py; each backend translates only the prose around them).
- A batch that fails is retried `retries` times, then its documents are retried one by one; a document that
  still fails is kept untranslated and counted by reason and listed by id (`failed_documents`). The stage fails
  when the failed fraction of all documents to translate (cache hits and cached failures included, so a rerun
  decides the same) exceeds `max_failure_fraction`, or at once when the backend is unusable.
- Translations and failures go through the persistent cache (cache.py), so a re-run translates only documents
  it has not seen. The cache key is (backend, model + direction, backend version + batch_size + max_chars,
  text) — batching changes apertium's output (see apertium.py). Backtranslation is two cached translation
  steps, so switching `mode` reuses the forward step instead of keying the whole chain by mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from tqdm import tqdm

from gpt.augment.apertium import ISO3, ApertiumConfig, ApertiumTranslator, pair_for
from gpt.augment.base import BackendUnavailable, IdentityTranslator, TranslationError, Translator
from gpt.augment.cache import TranslationCache, text_key
from gpt.augment.dictionary import DEFAULT_DIR, DictionaryConfig, DictionaryTranslator
from gpt.augment.marian import MarianConfig, MarianTranslator
from gpt.augment.protect import split_code
from gpt.config import ConfigError
from gpt.data.builtin import SOURCE_PREFIX
from gpt.data.corpus import CORPUS_SCHEMA, CorpusWriter, read_corpus
from gpt.errors import GptError

log = logging.getLogger(__name__)

# mt_model is the (first) model that translated the row; mt_model_back the model of the way back (backtranslate)
PROVENANCE = ("origin_id", "src_lang", "tgt_lang", "mt_backend", "mt_model", "mt_mode", "mt_model_back")
AUGMENTED_SCHEMA = pa.schema(list(CORPUS_SCHEMA) + [pa.field(name, pa.string(), nullable=True) for name in PROVENANCE])
WINDOW_DOCS = 4096  # selected documents gathered before translating, so all workers stay busy
DETECT_CHARS = 2000  # prose characters langid reads per document (more changes no decision on the default corpus)
KNOWN_LANGUAGE_SOURCES = (SOURCE_PREFIX,)  # sources whose rows are tagged with their true language


class AugmentFailed(GptError, RuntimeError):
    """Too many documents failed to translate (the message gives counts by reason and the failed ids)."""


@dataclass(frozen=True)
class AugmentConfig:
    """`augment:` in params.yaml. Backend-specific settings live in their own sub-sections."""

    enabled: bool = True
    backend: Literal["apertium", "marian", "dictionary", "none"] = "apertium"
    mode: Literal["translate", "backtranslate"] = "translate"
    src_lang: str = "en"
    tgt_lang: str = "es"
    fraction: float = 0.25  # of the eligible train documents, chosen by hash
    select_langs: list[str] | None = None  # documents whose `lang` is listed; null = [src_lang]
    seed: int = 0
    batch_size: int = 64  # documents per backend request
    max_chars: int = 50_000  # characters per backend request (a longer document goes alone)
    workers: int | None = None  # parallel requests for backends that allow it; null = CPU cores
    retries: int = 2
    max_failure_fraction: float = 0.05
    retry_failed: bool = False  # send documents whose translation failed in an earlier run to the backend again
    detect_lang: bool = True  # check each selected document's language with langid (unless its source is known)
    apertium: ApertiumConfig = field(default_factory=ApertiumConfig)
    marian: MarianConfig = field(default_factory=MarianConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"augment.fraction: must be in [0, 1], got {self.fraction}")
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"augment.tgt_lang: must differ from src_lang ({self.src_lang!r})")
        for key in ("batch_size", "max_chars"):
            if getattr(self, key) < 1:
                raise ConfigError(f"augment.{key}: must be >= 1, got {getattr(self, key)}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"augment.workers: must be >= 1 or null (= CPU cores), got {self.workers}")
        if self.retries < 0:
            raise ConfigError(f"augment.retries: must be >= 0, got {self.retries}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ConfigError(f"augment.max_failure_fraction: must be in [0, 1], got {self.max_failure_fraction}")
        if self.backend == "marian" and self.mode == "backtranslate":
            raise ConfigError("augment.mode: backtranslate needs two directions; the marian backend loads one model "
                              "(one direction), so use mode: translate")
        for key in ("src_lang", "tgt_lang"):
            if not re.fullmatch(r"[A-Za-z_-]{2,12}", getattr(self, key)):
                raise ConfigError(f"augment.{key}: {getattr(self, key)!r} is not a language code like 'en'")

    @property
    def active(self) -> bool:
        return self.enabled and self.backend != "none"

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def output_lang(self) -> str:
        return self.tgt_lang if self.mode == "translate" else self.src_lang


def make_translator(cfg: AugmentConfig, src: str, tgt: str) -> Translator:
    """The configured backend for one direction (raises BackendUnavailable with a how-to-fix message)."""
    if cfg.backend == "apertium":
        forward = pair_for(cfg.src_lang, cfg.tgt_lang)
        pair = pair_for(src, tgt)
        if cfg.apertium.pair:  # an explicit pair names the forward direction; reverse it for the way back
            pair = cfg.apertium.pair if pair == forward else "-".join(reversed(cfg.apertium.pair.split("-", 1)))
        return ApertiumTranslator(pair, cfg.apertium.timeout_s)
    if cfg.backend == "dictionary":
        path = cfg.dictionary.path or str(DEFAULT_DIR / f"freedict-{ISO3.get(src, src)}-{ISO3.get(tgt, tgt)}")
        if (src, tgt) != (cfg.src_lang, cfg.tgt_lang) and cfg.dictionary.path:
            raise ConfigError("augment.mode: backtranslate with a dictionary needs the reverse dictionary; "
                              "leave augment.dictionary.path null so freedict-<tgt>-<src> is used")
        return DictionaryTranslator(path)
    if cfg.backend == "marian":
        return MarianTranslator(cfg.marian)
    return IdentityTranslator()


def is_selected(doc_id: str, fraction: float, seed: int) -> bool:
    """Deterministic hash-fraction selection: independent of order, corpus size and other documents."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def translated_id(origin_id: str, steps: Sequence[Translator], mode: str, lang: str) -> str:
    """Stable id of a translated row: derived from its origin and provenance, not its (backend-dependent) text."""
    models = "\0".join(t.model for t in steps[1:])  # empty for translate: the ids of translate rows never changed
    key = f"{origin_id}\0{steps[0].name}\0{steps[0].model}\0{mode}\0{lang}" + (f"\0{models}" if models else "")
    return hashlib.sha256(key.encode()).hexdigest()


def _text_hash(text: str) -> bytes:
    return hashlib.sha256(text.strip().encode("utf-8")).digest()


def _requests(texts: Sequence[str], batch_size: int, max_chars: int) -> list[list[int]]:
    """Group text indices into backend requests of at most batch_size texts and max_chars characters."""
    groups: list[list[int]] = []
    current: list[int] = []
    chars = 0
    for i, text in enumerate(texts):
        if current and (len(current) >= batch_size or chars + len(text) > max_chars):
            groups.append(current)
            current, chars = [], 0
        current.append(i)
        chars += len(text)
    if current:
        groups.append(current)
    return groups


def _attempt(fn: Callable[[], list[str]], expected: int, retries: int) -> list[str]:
    """Call the backend up to retries+1 times; the last error propagates as a TranslationError with a reason."""
    for attempt in range(retries + 1):
        try:
            out = fn()
            if len(out) != expected:
                raise TranslationError("count_mismatch", f"{len(out)} outputs for {expected} inputs")
            return out
        except BackendUnavailable:
            raise
        except Exception as err:  # any backend error on these inputs: retry, then count it by reason
            if attempt == retries:
                if isinstance(err, TranslationError):
                    raise
                raise TranslationError(type(err).__name__, str(err)[:200]) from err
            time.sleep(min(0.05 * 2**attempt, 1.0))
    raise AssertionError("unreachable")


def translate_request(translator: Translator, texts: list[str], retries: int) -> list[tuple[str | None, str | None]]:
    """Translate one request; if it keeps failing, retry each document alone. Items: (translation, None) or
    (None, failure reason)."""
    try:
        outs = _attempt(lambda: translator.translate(texts), len(texts), retries)
    except TranslationError as err:
        if len(texts) == 1:
            return [(None, err.reason)]
        return [translate_request(translator, [text], retries)[0] for text in texts]
    return [(None, "empty_output") if text.strip() and not out.strip() else (out, None)
            for text, out in zip(texts, outs)]


@dataclass
class AugmentStats:
    """Counters for metrics/augment.json."""

    documents_in: int = 0
    documents_val: int = 0
    documents_eligible: int = 0  # train documents in a selected language
    documents_selected: int = 0  # chosen by hash among the eligible
    documents_skipped_lang: int = 0  # selected, but langid found them not in src_lang
    skipped_lang_by_detected: Counter = field(default_factory=Counter)
    documents_to_translate: int = 0  # selected and in src_lang: the failure threshold's denominator
    documents_sent: int = 0  # documents to translate that needed the backend (not fully cached)
    documents_translated: int = 0
    documents_failed: int = 0
    failures_by_reason: Counter = field(default_factory=Counter)
    failed_documents: list = field(default_factory=list)  # [{"id", "reason"}] in corpus order
    dropped_val_collision: int = 0
    cache_hits: int = 0  # translations served from the cache
    cached_failures: int = 0  # failures served from the cache (not retried; see augment.retry_failed)
    cache_misses: int = 0
    backend_requests: int = 0
    backend_chars: int = 0  # characters sent to the backend
    backend_seconds: float = 0.0
    chars_selected: int = 0
    chars_out: int = 0


class _Step:
    """One translation direction: cache lookup, then the misses in parallel requests, results into the cache."""

    def __init__(self, translator: Translator, cache: TranslationCache, cfg: AugmentConfig, stats: AugmentStats,
                 pool: ThreadPoolExecutor | None, bar: tqdm):
        self.translator, self.cache, self.cfg, self.stats, self.pool, self.bar = translator, cache, cfg, stats, pool, bar

    def run(self, texts: list[str]) -> tuple[list[tuple[str | None, str | None]], list[bool]]:
        tr, cfg = self.translator, self.cfg
        version = f"{tr.version}|batch_size={cfg.batch_size}|max_chars={cfg.max_chars}"  # batching changes output
        keys = [text_key(tr.name, tr.model, version, text) for text in texts]
        unique = list(dict.fromkeys(keys))
        results: dict[str, tuple[str | None, str | None]] = {k: (v, None) for k, v in self.cache.get_many(unique).items()}
        hits = sum(k in results for k in keys)
        if not cfg.retry_failed:
            failed = {k: r for k, r in self.cache.get_failures(unique).items() if k not in results}
            results.update((k, (None, r)) for k, r in failed.items())
            self.stats.cached_failures += sum(k in failed for k in keys)
        hit = [k in results for k in keys]
        self.stats.cache_hits += hits
        self.stats.cache_misses += len(texts) - sum(hit)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        todo = [k for k in unique if k not in results]
        todo_texts = [texts[first[k]] for k in todo]
        groups = _requests(todo_texts, self.cfg.batch_size, self.cfg.max_chars)
        self.bar.update(len(texts) - len(todo))
        start = time.perf_counter()

        def work(group: list[int]) -> list[tuple[str | None, str | None]]:
            return translate_request(tr, [todo_texts[i] for i in group], self.cfg.retries)

        parallel = self.pool is not None and tr.parallel
        for group, outs in zip(groups, self.pool.map(work, groups) if parallel else map(work, groups)):
            entries, failures = [], []
            for i, (out, reason) in zip(group, outs):
                results[todo[i]] = (out, reason)
                if out is not None:
                    entries.append((todo[i], tr.name, tr.model, out))
                else:
                    failures.append((todo[i], tr.name, tr.model, reason))
            self.cache.put_many(entries, failures)  # committed per request: an interrupted run keeps its work
            self.bar.update(len(group))
        self.stats.backend_requests += len(groups)
        self.stats.backend_chars += sum(map(len, todo_texts))
        self.stats.backend_seconds += time.perf_counter() - start
        return [results[k] for k in keys], hit


def _translate_window(rows: list[dict[str, Any]], steps: list[_Step], cfg: AugmentConfig,
                      val_hashes: set[bytes], stats: AugmentStats) -> list[dict[str, Any]]:
    """Translate the selected rows through every step; return the translated rows to add."""
    texts: list[str | None] = [row["text"] for row in rows]
    reasons: list[str | None] = [None] * len(rows)
    sent = [False] * len(rows)
    for n, step in enumerate(steps):
        live = [i for i, t in enumerate(texts) if t is not None]
        outs, hit = step.run([texts[i] for i in live])
        for i, (out, reason), was_hit in zip(live, outs, hit):
            texts[i] = out
            sent[i] = sent[i] or not was_hit
            if reason is not None:
                reasons[i] = reason if n == 0 else f"back_{reason}"
    stats.documents_sent += sum(sent)
    translators = [step.translator for step in steps]
    tr, back = translators[0], (translators[1].model if len(translators) > 1 else None)
    added = []
    for row, text, reason in zip(rows, texts, reasons):
        if text is None:
            stats.documents_failed += 1
            stats.failures_by_reason[reason or "unknown"] += 1
            stats.failed_documents.append({"id": row["id"], "reason": reason or "unknown"})
            continue
        if _text_hash(text) in val_hashes:
            stats.dropped_val_collision += 1
            continue
        stats.documents_translated += 1
        stats.chars_out += len(text)
        added.append({
            "id": translated_id(row["id"], translators, cfg.mode, cfg.output_lang), "text": text,
            "source": row["source"], "lang": cfg.output_lang, "split": "train", "origin_id": row["id"],
            "src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang, "mt_backend": tr.name, "mt_model": tr.model,
            "mt_mode": cfg.mode, "mt_model_back": back,
        })
    return added


def _with_provenance(batch: pa.RecordBatch) -> pa.Table:
    """An original batch with null provenance columns, in the augmented schema's column order."""
    table = pa.Table.from_batches([batch])
    for name in PROVENANCE:
        if name not in table.column_names:
            table = table.append_column(pa.field(name, pa.string()), pa.nulls(table.num_rows, pa.string()))
    return table.select(AUGMENTED_SCHEMA.names).cast(AUGMENTED_SCHEMA)


def _scan(cleaned: Path, cfg: AugmentConfig) -> tuple[set[bytes], int]:
    """First pass: hashes of validation texts (leakage guard) and the number of selected documents (progress)."""
    langs = set(cfg.select_langs or [cfg.src_lang])
    val_hashes: set[bytes] = set()
    selected = 0
    for batch in read_corpus(cleaned, columns=["id", "text", "split", "lang"]):
        cols = batch.to_pydict()
        for doc_id, text, split, lang in zip(cols["id"], cols["text"], cols["split"], cols["lang"]):
            if split == "val":
                val_hashes.add(_text_hash(text))
            elif split == "train" and lang in langs and is_selected(doc_id, cfg.fraction, cfg.seed):
                selected += 1
    return val_hashes, selected


class LanguageDetector:
    """langid on a document's prose (code cut out, first DETECT_CHARS characters); its model ships inside the
    package (no download) and is loaded on first use, so a corpus of known-language sources never pays for it."""

    def __init__(self):
        self._identifier = None

    def __call__(self, text: str) -> str:
        if self._identifier is None:
            try:
                from langid.langid import LanguageIdentifier, model
            except ImportError as err:
                raise GptError("augment.detect_lang: needs the `langid` package (`pip install -e '.[pipeline]'`), "
                               "or set augment.detect_lang: false to trust the corpus `lang` tags") from err
            self._identifier = LanguageIdentifier.from_modelstring(model, norm_probs=False)
        prose = " ".join(seg.text for seg in split_code(text[: 4 * DETECT_CHARS]) if not seg.is_code)
        return self._identifier.classify(prose[:DETECT_CHARS] or text[:DETECT_CHARS])[0]


def _needs_detection(cfg: AugmentConfig, source: str) -> bool:
    return cfg.detect_lang and not source.startswith(KNOWN_LANGUAGE_SOURCES)


def build_translators(cfg: AugmentConfig) -> list[Translator]:
    """The translation steps: [forward] for translate, [forward, backward] for backtranslate."""
    steps = [make_translator(cfg, cfg.src_lang, cfg.tgt_lang)]
    if cfg.mode == "backtranslate":
        steps.append(make_translator(cfg, cfg.tgt_lang, cfg.src_lang))
    return steps


def augment_corpus(cfg: AugmentConfig, cleaned: str | Path, augmented: str | Path, cache_dir: str | Path,
                   translators: list[Translator] | None = None, progress: bool = True) -> dict[str, Any]:
    """Write `augmented` = every row of `cleaned` + translated copies of the selected train documents.

    `translators` overrides the configured backend (one per step; tests pass fakes). Returns the metrics dict.
    Raises BackendUnavailable before any work when the backend cannot run, AugmentFailed (without writing
    `augmented`) when too many documents failed.
    """
    start = time.perf_counter()
    cleaned = Path(cleaned)
    stats = AugmentStats()
    if not cfg.active:
        with CorpusWriter(augmented, schema=AUGMENTED_SCHEMA) as writer:
            for batch in read_corpus(cleaned):
                writer.write(_with_provenance(batch))
                stats.documents_in += batch.num_rows
        return _metrics(cfg, stats, [], time.perf_counter() - start)
    steps = translators if translators is not None else build_translators(cfg)
    val_hashes, total = _scan(cleaned, cfg)
    langs = set(cfg.select_langs or [cfg.src_lang])
    workers = cfg.num_workers if any(t.parallel for t in steps) else 1
    detect = LanguageDetector()
    with (TranslationCache(cache_dir) as cache, CorpusWriter(augmented, schema=AUGMENTED_SCHEMA) as writer,
          ThreadPoolExecutor(max_workers=workers) as pool,
          tqdm(total=total * len(steps), desc=f"augment ({steps[0].name})", unit="doc",
               disable=None if progress else True) as bar):
        runners = [_Step(t, cache, cfg, stats, pool if workers > 1 else None, bar) for t in steps]
        pending: list[dict[str, Any]] = []
        for batch in read_corpus(cleaned):
            writer.write(_with_provenance(batch))
            for row in batch.to_pylist():
                stats.documents_in += 1
                if row["split"] != "train":
                    stats.documents_val += 1
                    continue
                if row["lang"] not in langs:
                    continue
                stats.documents_eligible += 1
                if not is_selected(row["id"], cfg.fraction, cfg.seed):
                    continue
                stats.documents_selected += 1
                if _needs_detection(cfg, row["source"]) and (lang := detect(row["text"])) != cfg.src_lang:
                    stats.documents_skipped_lang += 1
                    stats.skipped_lang_by_detected[lang] += 1
                    continue
                stats.documents_to_translate += 1
                stats.chars_selected += len(row["text"])
                pending.append(row)
            if len(pending) >= WINDOW_DOCS:
                writer.write(_translate_window(pending, runners, cfg, val_hashes, stats))
                pending = []
        if pending:
            writer.write(_translate_window(pending, runners, cfg, val_hashes, stats))
        _check_failures(cfg, stats, cleaned, Path(augmented))
    return _metrics(cfg, stats, steps, time.perf_counter() - start, workers)


def _check_failures(cfg: AugmentConfig, stats: AugmentStats, cleaned: Path, augmented: Path) -> None:
    """Judge failures over every document to translate, cached ones included, so a rerun decides the same."""
    if not stats.documents_failed:
        return
    ids = [f"{d['id']} ({d['reason']})" for d in stats.failed_documents]
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    counts = (f"{stats.documents_failed} of {stats.documents_to_translate} documents from {cleaned} failed to "
              f"translate ({dict(sorted(stats.failures_by_reason.items()))}): {shown}")
    if stats.documents_failed / stats.documents_to_translate <= cfg.max_failure_fraction:
        log.warning("augment: %s; they are kept untranslated (metrics: failed_documents)", counts)
        return
    earlier = "" if cfg.retry_failed or not stats.cached_failures else (
        f" {stats.cached_failures} of them failed in an earlier run and were not retried (augment.retry_failed: true "
        "retries them).")
    raise AugmentFailed(
        f"augment: {counts} — more than augment.max_failure_fraction={cfg.max_failure_fraction} allows, so "
        f"{augmented} was not written.{earlier} Raise augment.max_failure_fraction to keep them untranslated, or "
        "fix the backend; the translations that worked are cached"
    )


def _metrics(cfg: AugmentConfig, stats: AugmentStats, steps: list[Translator], elapsed: float,
             workers: int = 1) -> dict[str, Any]:
    metrics = dataclasses.asdict(stats)
    metrics["failures_by_reason"] = dict(sorted(stats.failures_by_reason.items()))
    metrics["skipped_lang_by_detected"] = dict(sorted(stats.skipped_lang_by_detected.items()))
    metrics["documents_out"] = stats.documents_in + stats.documents_translated
    metrics["backend_seconds"] = round(stats.backend_seconds, 3)
    metrics["backend_chars_per_s"] = round(stats.backend_chars / stats.backend_seconds, 1) if stats.backend_seconds else None
    metrics["elapsed_s"] = round(elapsed, 3)
    lookups = stats.cache_hits + stats.cache_misses
    metrics["cache_hit_rate"] = round(stats.cache_hits / lookups, 4) if lookups else None
    metrics["config"] = {"enabled": cfg.enabled, "backend": cfg.backend, "mode": cfg.mode, "src_lang": cfg.src_lang,
                         "tgt_lang": cfg.tgt_lang, "fraction": cfg.fraction, "workers": workers,
                         "batch_size": cfg.batch_size, "detect_lang": cfg.detect_lang}
    metrics["backends"] = [{"name": t.name, "model": t.model, "version": t.version,
                            **({"stats": dict(t.stats)} if hasattr(t, "stats") else {})} for t in steps]
    return metrics
