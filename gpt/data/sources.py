"""Raw text sources for `prepare`: local files under `paths.raw`, Hugging Face datasets, the built-in corpus.

Every source yields `RawDocument`s in a deterministic order (files sorted by path). Bad input never raises: a
binary, unreadable, empty or column-less file is skipped; invalid UTF-8, NUL bytes, a BOM or CRLF line ends are
repaired; a malformed JSON line or a record without text is skipped — each counted by reason in a `Tally`, with a
warning that names the file. Large inputs are streamed (JSON lines, CSV rows, Parquet batches, long text files in
paragraph-sized pieces) so memory does not grow with file size.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import io
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from gpt.config import ConfigError
from gpt.errors import GptError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".text"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
SUPPORTED = TEXT_SUFFIXES | JSONL_SUFFIXES | {".json", ".csv", ".parquet"}
# File signatures of common binary formats that may land in a raw folder by mistake.
BINARY_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"PK\x03\x04", b"\x1f\x8b", b"\x7fELF", b"%PDF", b"BZh", b"\xfd7zXZ")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One entry of params.yaml `prepare.sources`."""

    kind: Literal["builtin", "files", "hf"]
    glob: str = "**/*"  # files: pattern relative to paths.raw
    text_field: str = "text"  # files (json/jsonl/csv/parquet) and hf: the column holding the text
    lang: str = "en"  # language tag for the rows (prepare.langid, when enabled, replaces it with the detected one)
    name: str | None = None  # hf: a dataset name (load_dataset, needs network) or a save_to_disk directory
    config: str | None = None  # hf: dataset configuration name
    split: str = "train"  # hf: which split to read
    max_documents: int | None = None  # stop after this many documents from this source (quick runs)

    def __post_init__(self) -> None:
        if self.kind == "hf" and not self.name:
            raise ConfigError("prepare.sources: kind hf needs `name` (dataset name or save_to_disk directory)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"prepare.sources: max_documents must be >= 1 or null, got {self.max_documents}")
        if not self.text_field:
            raise ConfigError("prepare.sources: text_field must be non-empty")


@dataclasses.dataclass
class RawDocument:
    text: str
    source: str
    lang: str


class Tally:
    """Counts of skipped/repaired inputs by reason, plus the warnings that name the file."""

    def __init__(self) -> None:
        self.files_skipped: Counter = Counter()
        self.records_skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.files_read = 0
        self.bytes_read = 0

    def skip_file(self, path: Path | str, reason: str, detail: str = "") -> None:
        self.files_skipped[reason] += 1
        log.warning("skipped %s: %s%s", path, reason, f" ({detail})" if detail else "")

    def skip_records(self, path: Path | str, reason: str, count: int) -> None:
        if count:
            self.records_skipped[reason] += count
            log.warning("%s: skipped %d record(s): %s", path, count, reason)

    def repair(self, path: Path | str, repairs: Counter) -> None:
        """Add one file's repairs (reason -> number of records repaired) with a single warning."""
        repairs = +repairs
        if repairs:
            self.repaired.update(repairs)
            log.warning("%s: repaired %s", path, ", ".join(f"{k} x{v}" for k, v in sorted(repairs.items())))

    def as_dict(self) -> dict:
        return {
            "files_read": self.files_read,
            "bytes_read": self.bytes_read,
            "files_skipped": dict(sorted(self.files_skipped.items())),
            "records_skipped": dict(sorted(self.records_skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
        }


def looks_binary(sample: bytes) -> bool:
    """A known binary signature, or many control bytes (text has almost none besides tab/newline)."""
    if sample.startswith(BINARY_MAGIC):
        return True
    if not sample or sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    control = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13, 27))
    return control / len(sample) > 0.1


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _DECODE_ERRORS[0] += 1
    return "\ufffd", err.end


_DECODE_ERRORS = [0]  # per-thread accuracy is not needed: prepare reads files one at a time
codecs.register_error("gpt_count_replace", _count_and_replace)


def decode_text(data: bytes, repairs: Counter) -> str:
    """Bytes → str, repairing BOM, UTF-16, NUL bytes, invalid UTF-8 (→ U+FFFD) and CRLF/CR line ends.

    Each repair is counted in `repairs` (the caller reports them once per file)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        repairs["utf16_decoded"] += 1
        text = data.decode("utf-16", errors="replace")
    else:
        if data.startswith(codecs.BOM_UTF8):
            repairs["bom_removed"] += 1
            data = data[len(codecs.BOM_UTF8) :]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            repairs["invalid_utf8_replaced"] += 1
    if "\x00" in text:
        repairs["nul_bytes_removed"] += 1
        text = text.replace("\x00", "")
    if "\r" in text:
        repairs["crlf_normalized"] += 1
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def iter_lines(f: io.BufferedReader, limit: int) -> Iterator[bytes | None]:
    """Binary lines of at most `limit` bytes; a longer line is consumed in pieces and yielded as None."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while True:  # drain the rest of the over-long line without holding it
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
        else:
            yield line


# ---------------------------------------------------------------- local files


def _text_pieces(f: io.BufferedReader, limit: int, repairs: Counter, skipped: Counter) -> Iterator[str]:
    """A text file larger than `limit` bytes, as documents ending at blank lines (~limit/4 .. limit bytes each)."""
    buf: list[bytes] = []
    size = 0
    for line in iter_lines(f, limit):
        if line is None:
            skipped["line_too_long"] += 1
            continue
        buf.append(line)
        size += len(line)
        if size >= limit or (size >= limit // 4 and not line.strip()):
            yield decode_text(b"".join(buf), repairs)
            buf, size = [], 0
    if buf:
        yield decode_text(b"".join(buf), repairs)


def _read_text(path: Path, f: io.BufferedReader, limit: int, repairs: Counter, skipped: Counter) -> Iterator[str]:
    head = f.read(2)
    f.seek(0)
    if path.stat().st_size <= limit or head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        yield decode_text(f.read(), repairs)
    else:
        yield from _text_pieces(f, limit, repairs, skipped)


def _json_texts(record: object, field: str, skipped: Counter) -> Iterator[str]:
    if isinstance(record, dict) and isinstance(record.get(field), str):
        yield record[field]
    elif isinstance(record, str):
        yield record
    else:
        skipped["missing_text_field"] += 1


def _read_jsonl(f: io.BufferedReader, field: str, limit: int, repairs: Counter, skipped: Counter) -> Iterator[str]:
    for line in iter_lines(f, limit):
        if line is None:
            skipped["line_too_long"] += 1
            continue
        text = decode_text(line, repairs).strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            skipped["malformed_json"] += 1
            continue
        yield from _json_texts(record, field, skipped)


def _read_json(f: io.BufferedReader, field: str, limit: int, repairs: Counter, skipped: Counter) -> Iterator[str]:
    text = decode_text(f.read(limit + 1), repairs)
    if len(text) > limit:
        raise _SkipFile("too_large", f"over {limit} bytes; use JSON Lines (.jsonl) for big files")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # maybe JSON Lines saved as .json
        f.seek(0)
        before = skipped["malformed_json"]
        records = list(_read_jsonl(f, field, limit, Counter(), skipped))
        if not records and skipped["malformed_json"] > before:
            skipped["malformed_json"] = before
            raise _SkipFile("malformed_json", "not JSON, nor JSON Lines") from None
        yield from records
        return
    for record in data if isinstance(data, list) else [data]:
        yield from _json_texts(record, field, skipped)


def _read_csv(path: Path, field: str, limit: int, skipped: Counter, repairs: Counter) -> Iterator[str]:
    csv.field_size_limit(limit)
    errors_before = _DECODE_ERRORS[0]
    with open(path, encoding="utf-8-sig", errors="gpt_count_replace", newline="") as f:
        reader = csv.DictReader(f)
        if field not in (reader.fieldnames or []):
            raise _SkipFile("missing_text_column", f"no column {field!r}; columns: {reader.fieldnames}")
        try:
            for row in reader:
                value = row.get(field)
                if isinstance(value, str):
                    yield value.replace("\x00", "")
                else:
                    skipped["missing_text_field"] += 1
        except csv.Error as err:
            skipped["malformed_csv"] += 1
            log.warning("%s: stopped reading at a malformed CSV row (%s)", path, err)
    if _DECODE_ERRORS[0] > errors_before:
        repairs["invalid_utf8_replaced"] += _DECODE_ERRORS[0] - errors_before


def _read_parquet(path: Path, field: str, skipped: Counter) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _SkipFile("unreadable", str(err)) from err
    schema = pfile.schema_arrow
    if field not in schema.names:
        raise _SkipFile("missing_text_column", f"no column {field!r}; columns: {schema.names}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        raise _SkipFile("missing_text_column", f"column {field!r} has type {kind}, not text")
    for batch in pfile.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                skipped["missing_text_field"] += 1
            else:
                yield value if isinstance(value, str) else value.decode("utf-8", errors="replace")


class _SkipFile(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _file_texts(path: Path, field: str, limit: int, repairs: Counter, skipped: Counter) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, field, skipped)
        return
    if path.stat().st_size == 0:
        raise _SkipFile("empty")
    with open(path, "rb") as f:
        if looks_binary(f.read(8192)):
            raise _SkipFile("binary")
        f.seek(0)
        if suffix in TEXT_SUFFIXES:
            yield from _read_text(path, f, limit, repairs, skipped)
        elif suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(f, field, limit, repairs, skipped)
        elif suffix == ".json":
            yield from _read_json(f, field, limit, repairs, skipped)
        elif suffix == ".csv":
            yield from _read_csv(path, field, limit, skipped, repairs)


def list_raw_files(raw_dir: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` under `raw_dir`, sorted; hidden files and DVC/git bookkeeping are left out."""
    if not raw_dir.is_dir():
        return []
    found = []
    for path in raw_dir.glob(pattern):
        rel = path.relative_to(raw_dir)
        if path.is_dir() or any(p.startswith(".") for p in rel.parts) or path.suffix == ".dvc":
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(raw_dir).as_posix())


def iter_file_documents(raw_dir: Path, cfg: SourceConfig, tally: Tally, limit: int) -> Iterator[RawDocument]:
    for path in list_raw_files(raw_dir, cfg.glob):
        label = f"file:{path.relative_to(raw_dir).as_posix()}"
        if path.suffix.lower() not in SUPPORTED:
            tally.skip_file(path, "unsupported_extension", f"supported: {sorted(SUPPORTED)}")
            continue
        repairs: Counter = Counter()
        skipped: Counter = Counter()
        count = 0
        try:
            for text in _file_texts(path, cfg.text_field, limit, repairs, skipped):
                count += 1
                yield RawDocument(text, label, cfg.lang)
        except _SkipFile as skip:
            tally.skip_file(path, skip.reason, skip.detail)
        except (OSError, ValueError) as err:  # permissions, a path that vanished, a broken link, a bad encoding
            tally.skip_file(path, "unreadable", f"{type(err).__name__}: {err}")
        else:
            tally.files_read += 1
            with contextlib.suppress(OSError):
                tally.bytes_read += path.stat().st_size
            if count == 0 and not skipped:
                tally.skip_file(path, "no_documents")
        tally.repair(path, repairs)
        for reason, n in sorted(skipped.items()):
            tally.skip_records(path, reason, n)


# ---------------------------------------------------------------- Hugging Face datasets and the built-in corpus


class SourceError(GptError, RuntimeError):
    """A configured source cannot be opened at all (e.g. a dataset name while offline)."""


def _open_hf_dataset(cfg: SourceConfig):
    import datasets

    local = Path(cfg.name)
    try:
        if local.exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise SourceError(f"prepare.sources: {cfg.name} has splits {list(ds)}, not {cfg.split!r}")
                ds = ds[cfg.split]
            return ds
        return datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, streaming=True)
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(
            f"prepare.sources: could not load Hugging Face dataset {cfg.name!r} ({type(err).__name__}: {err}). "
            "Offline? Load it once where you have network, `save_to_disk` it under data/raw/, and point name there."
        ) from err


def iter_hf_documents(cfg: SourceConfig, tally: Tally) -> Iterator[RawDocument]:
    ds = _open_hf_dataset(cfg)
    label = f"hf:{cfg.name}" + (f"/{cfg.config}" if cfg.config else "") + f":{cfg.split}"
    names = getattr(ds, "column_names", None)
    if names is not None and cfg.text_field not in names:
        tally.skip_file(label, "missing_text_column", f"no column {cfg.text_field!r}; columns: {names}")
        return
    missing = 0
    for row in ds:
        value = row.get(cfg.text_field)
        if isinstance(value, str):
            yield RawDocument(value, label, cfg.lang)
        else:
            missing += 1
    tally.files_read += 1
    tally.skip_records(label, "missing_text_field", missing)


def iter_source(cfg: SourceConfig, raw_dir: Path, tally: Tally, limit: int, builtin_stats=None) -> Iterator[RawDocument]:
    """Documents of one configured source, at most `cfg.max_documents`."""
    if cfg.kind == "builtin":
        from gpt.data.builtin import iter_builtin_documents

        docs: Iterator[RawDocument] = (
            RawDocument(text, source, cfg.lang) for source, text in iter_builtin_documents(builtin_stats)
        )
    elif cfg.kind == "files":
        docs = iter_file_documents(raw_dir, cfg, tally, limit)
    else:
        docs = iter_hf_documents(cfg, tally)
    return itertools.islice(docs, cfg.max_documents)
