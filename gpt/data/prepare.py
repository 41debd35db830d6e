"""`prepare`: raw sources → cleaned, deduplicated, split corpus (Parquet parts) + counts for metrics/prepare.json.

One streaming pass in a fixed order: read each source's documents, clean them, split those longer than
`clean.max_chars` into pieces (or drop them, with `clean.too_long: drop`), drop by quality / language / duplicate
(every drop counted by reason), give each kept document an id and a split drawn from its origin (so adding
documents never moves old ones between train and val), and write them with `CorpusWriter`.

Ids: a whole document's id is the content hash of its cleaned text. A piece of a long document (or of a file read
in pieces) has the id `<origin>-<piece number>`, where origin is the content hash of the whole document (or of the
file): `origin_id(id)` recovers it, and every piece of one document lands in the same split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import platform
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from gpt.config import ConfigError
from gpt.data.clean import CleanConfig, QualityConfig, clean_text, quality_problem, split_long_text
from gpt.data.corpus import CorpusWriter
from gpt.data.dedup import DedupConfig, Deduplicator, content_id
from gpt.data.sources import RawDocument, SourceConfig, Tally, dangling_links, iter_source
from gpt.errors import GptError


class PrepareError(GptError, RuntimeError):
    """Nothing usable came out of the sources (the message says what was dropped and why)."""


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.05
    salt: str = "v1"  # change it to draw a different (still deterministic) split

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"prepare.split.val_fraction: must be in [0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class LangIdConfig:
    """Optional language identification with `langid` (its model ships inside the package; no download)."""

    enabled: bool = False
    keep: list[str] = dataclasses.field(default_factory=list)  # empty: tag every document, drop none
    min_probability: float = 0.0
    max_chars: int = 2000  # classify only the start of long documents

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_probability <= 1.0:
            raise ConfigError(f"prepare.langid.min_probability: must be in [0, 1], got {self.min_probability}")


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="builtin"), SourceConfig(kind="files")]


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """params.yaml `prepare:`."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=_default_sources)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    clean: CleanConfig = dataclasses.field(default_factory=CleanConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    langid: LangIdConfig = dataclasses.field(default_factory=LangIdConfig)
    rows_per_file: int = 50_000
    # A text file larger than this is read in pieces (then split like any long document); a JSON line or a CSV
    # field larger than this is skipped and counted.
    max_record_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("prepare.sources: list at least one source (kind: builtin | files | hf)")
        if self.rows_per_file < 1:
            raise ConfigError(f"prepare.rows_per_file: must be >= 1, got {self.rows_per_file}")
        if self.max_record_bytes < 1024:
            raise ConfigError(f"prepare.max_record_bytes: must be >= 1024, got {self.max_record_bytes}")


def origin_id(doc_id: str) -> str:
    """The id of the whole document a piece was cut from (a whole document's own id)."""
    return doc_id.split("-", 1)[0]


def assign_split(doc_id: str, cfg: SplitConfig) -> str:
    """"val" for a fixed fraction of ids, decided by the hash of the id's origin alone (pieces stay together)."""
    doc_id = origin_id(doc_id)
    digest = hashlib.sha256(f"{cfg.salt}:{doc_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < cfg.val_fraction * 2**64 else "train"


@functools.cache
def _langid_model():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)  # ~2 s to unpack: once per process


class _LanguageId:
    def __init__(self, cfg: LangIdConfig) -> None:
        self.cfg = cfg
        self.identifier = _langid_model()

    def classify(self, text: str) -> tuple[str, bool]:
        """(language, keep?)"""
        lang, prob = self.identifier.classify(text[: self.cfg.max_chars])
        ok = (not self.cfg.keep or lang in self.cfg.keep) and prob >= self.cfg.min_probability
        return lang, ok


@dataclasses.dataclass
class _Counts:
    docs_in: int = 0
    bytes_in: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    repaired: Counter = dataclasses.field(default_factory=Counter)
    splits: dict = dataclasses.field(default_factory=lambda: {s: {"documents": 0, "bytes": 0} for s in ("train", "val")})
    by_source: Counter = dataclasses.field(default_factory=Counter)
    long_documents: int = 0  # documents longer than clean.max_chars, split into pieces
    pieces: int = 0
    origin: str | None = None  # the file being read in pieces, and the number of its next piece
    next_piece: int = 0


class RawDataError(GptError, RuntimeError):
    """paths.raw holds something DVC cannot hash (a dangling symbolic link)."""


def check_raw_dir(raw_dir: Path) -> None:
    """Fail naming every dangling symbolic link under `raw_dir` (`dvc status`/`dvc repro` break on them)."""
    links = dangling_links(Path(raw_dir))
    if links:
        named = ", ".join(f"{link} -> {link.readlink()}" for link in links)
        raise RawDataError(
            f"{raw_dir}: dangling symbolic link(s) {named}; DVC cannot hash {raw_dir} while they are there. "
            "Restore the target or delete the link"
        )


def prepare_corpus(cfg: PrepareConfig, raw_dir: Path, out_dir: Path) -> dict:
    """Run the whole `prepare` pass; returns the metrics dict. Raises PrepareError if nothing survives."""
    from gpt.data.builtin import BuiltinStats

    if any(source.kind == "files" for source in cfg.sources):
        check_raw_dir(raw_dir)
    tally, counts, builtin = Tally(), _Counts(), BuiltinStats()
    dedup = Deduplicator(cfg.dedup)
    langid = _LanguageId(cfg.langid) if cfg.langid.enabled else None
    with CorpusWriter(out_dir, rows_per_file=cfg.rows_per_file) as writer:
        for i, source in enumerate(cfg.sources):
            docs = iter_source(source, Path(raw_dir), tally, cfg.max_record_bytes, builtin, f"prepare.sources[{i}]")
            for doc in tqdm(docs, desc=f"prepare {source.kind}", unit="doc", mininterval=2.0, disable=None):
                rows = [row for row in _process(doc, cfg, counts, dedup, langid) if row is not None]
                writer.write(rows)
        documents_out = sum(s["documents"] for s in counts.splits.values())
        if documents_out == 0:
            notes = f" {'; '.join(tally.notes)}." if tally.notes else ""
            raise PrepareError(
                f"prepare: no documents left ({counts.docs_in} read; dropped {dict(counts.dropped)}; "
                f"files skipped {dict(tally.files_skipped)}).{notes} Check prepare.sources and the filters in "
                "params.yaml."
            )
    return _metrics(cfg, counts, tally, builtin, writer.num_files)


def _pieces(doc: RawDocument, text: str, max_chars: int, counts: _Counts) -> list[tuple[str, str]]:
    """(id, text) of the documents one cleaned raw document becomes: itself, or its pieces when it is too long."""
    if doc.origin is None and len(text) <= max_chars:
        return [(content_id(text), text)]
    if doc.origin is None:  # a long document: pieces numbered from 0
        origin, first = content_id(text), 0
        counts.long_documents += 1
    else:  # one piece of a file read in pieces: numbering goes on from the file's previous piece
        if doc.origin != counts.origin:
            counts.origin, counts.next_piece = doc.origin, 0
            counts.long_documents += 1
        origin, first = doc.origin, counts.next_piece
    pieces = split_long_text(text, max_chars)
    counts.pieces += len(pieces)
    counts.next_piece = first + len(pieces)
    return [(f"{origin}-{first + k:05d}", piece) for k, piece in enumerate(pieces)]


def _process(doc: RawDocument, cfg: PrepareConfig, counts: _Counts, dedup: Deduplicator, langid):
    """The corpus rows of one raw document (None for each piece dropped; the reason is counted)."""
    counts.docs_in += 1
    counts.bytes_in += len(doc.text.encode("utf-8", errors="replace"))
    text = clean_text(doc.text, cfg.clean, counts.repaired)
    if cfg.clean.too_long == "drop" and (len(text) > cfg.clean.max_chars or doc.origin is not None):
        counts.dropped["too_long"] += 1  # a file too big to read whole is too long too
        return [None]
    return [_keep_or_drop(doc_id, piece, doc, cfg, counts, dedup, langid)
            for doc_id, piece in _pieces(doc, text, cfg.clean.max_chars, counts)]


def _keep_or_drop(doc_id: str, text: str, doc: RawDocument, cfg: PrepareConfig, counts: _Counts, dedup, langid):
    reason = quality_problem(text, cfg.clean, cfg.quality)
    lang = doc.lang
    if reason is None and langid is not None:
        lang, ok = langid.classify(text)
        reason = None if ok else "language"
    if reason is None:
        duplicate = dedup.is_duplicate(text)
        reason = f"{duplicate}_duplicate" if duplicate else None
    if reason is not None:
        counts.dropped[reason] += 1
        return None
    split = assign_split(doc_id, cfg.split)
    counts.splits[split]["documents"] += 1
    counts.splits[split]["bytes"] += len(text.encode("utf-8"))
    counts.by_source[doc.source.split(":", 1)[0]] += 1
    return {"id": doc_id, "text": text, "source": doc.source, "lang": lang, "split": split}


def _metrics(cfg: PrepareConfig, counts: _Counts, tally: Tally, builtin, num_files: int) -> dict:
    metrics = {
        "documents_in": counts.docs_in,
        "bytes_in": counts.bytes_in,
        "documents_out": sum(s["documents"] for s in counts.splits.values()),
        "bytes_out": sum(s["bytes"] for s in counts.splits.values()),
        "dropped": dict(sorted(counts.dropped.items())),
        "cleaned": dict(sorted((+counts.repaired).items())),
        "splits": counts.splits,
        "documents_by_source": dict(sorted(counts.by_source.items())),
        # documents over clean.max_chars (or files over max_record_bytes), and the pieces they were cut into
        "long_documents_split": {"documents": counts.long_documents, "pieces": counts.pieces},
        "inputs": tally.as_dict(),
        "parquet_files": num_files,
    }
    if any(s.kind == "builtin" for s in cfg.sources):
        metrics["builtin"] = {
            "python": platform.python_version(),
            "python_modules": builtin.modules,
            "c_modules": builtin.c_modules,
            "topics": builtin.topics,
            "skipped": dict(sorted(builtin.skipped.items())),
        }
    return metrics
