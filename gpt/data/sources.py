"""Raw text sources for `prepare`: local files under `paths.raw`, Hugging Face datasets, the built-in corpus.

Every source yields `RawDocument`s in a deterministic order (files sorted by path). Bad input in one file never
stops the others: a binary, unreadable, empty or column-less file is skipped; a non-UTF-8 encoding (Latin-1,
cp1252, ...) is detected with charset-normalizer and decoded; NUL bytes, a BOM or CRLF line ends are repaired; a
malformed JSON line or CSV row or a record without text is skipped — each counted by reason in a `Tally`, with a
warning that names the file. Large inputs are streamed (JSON lines, CSV rows, Parquet batches, text files over
`max_record_bytes` in pieces cut at paragraph/line/sentence ends, all sharing the file's origin id) so memory does
not grow with file size.

A configured source that matched input but yields no document at all is an error naming the source, the text
field it looked for and the keys it found (a glob that matches nothing is a warning: the default `files` source
reads an empty data/raw).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from gpt.config import ConfigError
from gpt.data.clean import remove_control_chars
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
    origin: str | None = None  # set on the pieces of a file read in pieces: the file's content hash, shared by all


class SourceError(GptError, RuntimeError):
    """A configured source cannot be opened, or yields no document at all (the message names source and field)."""


class Tally:
    """Counts of skipped/repaired inputs by reason, plus the warnings that name the file."""

    def __init__(self) -> None:
        self.files_skipped: Counter = Counter()
        self.records_skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.files_read = 0
        self.bytes_read = 0
        self.notes: list[str] = []  # sources that found nothing to read (a glob matching no file, no raw dir)

    def skip_file(self, path: Path | str, reason: str, detail: str = "") -> None:
        self.files_skipped[reason] += 1
        log.warning("skipped %s: %s%s", path, reason, f" ({detail})" if detail else "")

    def note(self, message: str) -> None:
        self.notes.append(message)
        log.warning("%s", message)

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
DETECT_SAMPLE_BYTES = 1 << 20  # how much of a file the encoding detector looks at


def _is_utf8(name: str) -> bool:
    return codecs.lookup(name).name == "utf-8"


def detect_encoding(data: bytes) -> str:
    """The encoding of `data`: "utf-8" when it decodes as UTF-8 — or mostly does (real multi-byte characters next
    to a few bad bytes: a damaged UTF-8 file, not another encoding) — else charset-normalizer's best guess, with
    cp1252 preferred among guesses that decode to the same text (short Western text fits many code pages)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data[:DETECT_SAMPLE_BYTES], final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    sample = data[:DETECT_SAMPLE_BYTES]
    if any(ord(c) > 127 and c != "\ufffd" for c in sample.decode("utf-8", errors="replace")):
        return "utf-8"
    from charset_normalizer import from_bytes

    matches = from_bytes(sample)
    best = matches.best()
    if best is None:
        return "utf-8"  # nothing fits: decode as UTF-8, replacing (and counting) the bad bytes
    for match in matches:
        if "cp1252" in match.could_be_from_charset and match.chaos <= best.chaos + 0.01:
            return "cp1252"
    return best.encoding


def decode_text(data: bytes, repairs: Counter, encoding: str | None = None) -> str:
    """Bytes → str, repairing BOM, UTF-16, other encodings (detected unless `encoding` is given), NUL bytes,
    invalid UTF-8 (→ U+FFFD) and CRLF/CR line ends.

    Each repair is counted in `repairs` (the caller reports them once per file)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        repairs["utf16_decoded"] += 1
        text = data.decode("utf-16", errors="replace")
    else:
        if data.startswith(codecs.BOM_UTF8):
            repairs["bom_removed"] += 1
            data = data[len(codecs.BOM_UTF8) :]
        encoding = encoding or detect_encoding(data)
        if not _is_utf8(encoding):
            repairs["reencoded"] += 1
            text = data.decode(encoding, errors="replace")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="replace")
                repairs["invalid_utf8_replaced"] += 1
    if "\x00" in text:
        repairs["nul_bytes_removed"] += 1
        text = remove_control_chars(text, nul_only=True)
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


@dataclasses.dataclass
class _FileState:
    """What reading one file found besides its documents."""

    repairs: Counter = dataclasses.field(default_factory=Counter)
    skipped: Counter = dataclasses.field(default_factory=Counter)  # records skipped, by reason
    keys: set[str] = dataclasses.field(default_factory=set)  # keys/columns of records that lacked the text field
    origin: str | None = None  # the file's content hash when it is read in pieces
    problem: str | None = None  # why the whole file was skipped

    def saw_keys(self, keys) -> None:
        if len(self.keys) < 50:
            self.keys.update(str(k) for k in itertools.islice(keys, 50))


class _SkipFile(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# Where to end a piece of a text file that is read in pieces: after a blank line, else a line end, else a sentence
# end, else a space (ASCII bytes, so no cut falls inside a character of UTF-8 or of the legacy encodings).
_CUTS = (b"\n\n", b"\n", b". ", b" ")


def _cut_point(block: bytes) -> int:
    for sep in _CUTS:
        i = block.rfind(sep, len(block) // 4)  # pieces of at least a quarter of the limit
        if i >= 0:
            return i + len(sep)
    cut = len(block) - 1
    while cut > 0 and 0x80 <= block[cut] < 0xC0:  # not inside a UTF-8 character
        cut -= 1
    return cut


def _file_sha256(f: io.BufferedReader) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    f.seek(0)
    return digest.hexdigest()[:32]


def _read_text(path: Path, f: io.BufferedReader, limit: int, st: _FileState) -> Iterator[str]:
    """The whole file as one document; a file over `limit` bytes in pieces of at most `limit` bytes, each cut at
    `_cut_point` and decoded with the encoding detected on the first piece (`prepare` splits them further to
    `clean.max_chars`; all share the file's content hash as origin)."""
    head = f.read(2)
    f.seek(0)
    if path.stat().st_size <= limit or head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        yield decode_text(f.read(), st.repairs)
        return
    st.origin = _file_sha256(f)
    encoding, carry = None, b""
    while block := carry + f.read(limit - len(carry)):
        at_end = len(block) < limit
        cut = len(block) if at_end else _cut_point(block)
        encoding = encoding or detect_encoding(block)
        yield decode_text(block[:cut], st.repairs, encoding)
        carry = block[cut:]


def _json_texts(record: object, field: str, st: _FileState) -> Iterator[str]:
    if isinstance(record, dict) and isinstance(record.get(field), str):
        yield record[field]
    elif isinstance(record, str):
        yield record
    else:
        st.skipped["missing_text_field"] += 1
        if isinstance(record, dict):
            st.saw_keys(record)


def _read_jsonl(f: io.BufferedReader, field: str, limit: int, st: _FileState) -> Iterator[str]:
    encoding = detect_encoding(f.read(DETECT_SAMPLE_BYTES))
    f.seek(0)
    for line in iter_lines(f, limit):
        if line is None:
            st.skipped["line_too_long"] += 1
            continue
        text = decode_text(line, st.repairs, encoding).strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            st.skipped["malformed_json"] += 1
            continue
        yield from _json_texts(record, field, st)


def _read_json(f: io.BufferedReader, field: str, limit: int, st: _FileState) -> Iterator[str]:
    text = decode_text(f.read(limit + 1), st.repairs)
    if len(text) > limit:
        raise _SkipFile("too_large", f"over {limit} bytes; use JSON Lines (.jsonl) for big files")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # maybe JSON Lines saved as .json
        f.seek(0)
        lines = _FileState(keys=st.keys)
        records = list(_read_jsonl(f, field, limit, lines))
        if not records and lines.skipped["malformed_json"]:
            raise _SkipFile("malformed_json", "not JSON, nor JSON Lines") from None
        st.skipped.update(lines.skipped)
        yield from records
        return
    for record in data if isinstance(data, list) else [data]:
        yield from _json_texts(record, field, st)


class _LineTooLong(Exception):
    pass


class _CsvLines:
    """The lines of a CSV file, fed to `csv.reader` one at a time. It remembers the lines of the record being
    parsed, so that a malformed record gives back all but its first line to be parsed again: one stray quote then
    costs one row, not every row up to the next quote."""

    def __init__(self, f: io.TextIOBase, limit: int) -> None:
        self.f, self.limit = f, limit
        self.pending: deque[str] = deque()
        self.record: list[str] = []

    def __iter__(self) -> _CsvLines:
        return self

    def _next_line(self) -> str:
        return self.pending.popleft() if self.pending else self.f.readline(self.limit + 1)

    def __next__(self) -> str:
        line = self._next_line()
        if not line:
            raise StopIteration
        if len(line) > self.limit:
            while (rest := self.f.readline(1 << 20)) and not rest.endswith("\n"):
                pass  # drain the rest of the over-long line without holding it
            raise _LineTooLong
        self.record.append(line)
        return line

    def give_back(self) -> None:
        """Parse the failed record's lines again, from its second line."""
        self.pending.extendleft(reversed(self.record[1:]))
        self.record = []

    def skip_quoted_field(self) -> None:
        """Consume lines up to the end of the quoted field the failed record is in (an even number of quotes)."""
        quotes = sum(line.count('"') for line in self.record)
        while quotes % 2 and (line := self._next_line()):
            quotes += line.count('"')
        self.record = []


def _parses_as_rows(lines: list[str], n_fields: int) -> bool:
    """Most of `lines`, each parsed alone, are rows of `n_fields` fields (rows swallowed by a stray quote, not the
    lines of one huge quoted field)."""
    sample = lines[:20]
    good = 0
    for line in sample:
        with contextlib.suppress(csv.Error):
            good += len(next(csv.reader([line], strict=True), [])) == n_fields
    return len(sample) >= 2 and good >= 0.8 * len(sample)


def _csv_reason(err: csv.Error) -> str:
    message = str(err)
    if "field larger than field limit" in message:
        return "csv_field_too_large"
    if "unexpected end of data" in message:
        return "csv_unclosed_quote"
    if "expected after" in message:
        return "csv_stray_quote"
    return "csv_malformed"


def _read_csv(path: Path, field: str, limit: int, st: _FileState) -> Iterator[str]:
    """Rows of a CSV file, parsed strictly: a malformed row is skipped, counted by reason, and reading goes on."""
    with open(path, "rb") as raw:
        encoding = detect_encoding(raw.read(DETECT_SAMPLE_BYTES))
    if _is_utf8(encoding):
        encoding, errors = "utf-8-sig", "gpt_count_replace"
    else:
        st.repairs["reencoded"] += 1
        errors = "replace"
    csv.field_size_limit(limit)
    errors_before = _DECODE_ERRORS[0]
    with open(path, encoding=encoding, errors=errors, newline="") as f:
        lines = _CsvLines(f, limit)
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader, None)
        except (csv.Error, _LineTooLong) as err:
            raise _SkipFile("malformed_csv", f"unreadable header row ({err})") from None
        if header is None:
            raise _SkipFile("empty")
        if field not in header:
            st.saw_keys(header)
            raise _SkipFile("missing_text_column", f"no column {field!r}; columns: {header}")
        column = header.index(field)
        while True:
            lines.record = []
            try:
                row = next(reader)
            except StopIteration:
                break
            except _LineTooLong:
                st.skipped["csv_line_too_long"] += 1
                lines.give_back()
                continue
            except csv.Error as err:
                reason = _csv_reason(err)
                st.skipped[reason] += 1
                if reason == "csv_field_too_large" and not _parses_as_rows(lines.record[1:], len(header)):
                    lines.skip_quoted_field()
                else:
                    lines.give_back()
                continue
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                st.skipped["csv_wrong_field_count"] += 1
                lines.give_back()
                continue
            yield row[column]
    if _DECODE_ERRORS[0] > errors_before:
        st.repairs["invalid_utf8_replaced"] += _DECODE_ERRORS[0] - errors_before


def _read_parquet(path: Path, field: str, st: _FileState) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _SkipFile("unreadable", str(err)) from err
    schema = pfile.schema_arrow
    if field not in schema.names:
        st.saw_keys(schema.names)
        raise _SkipFile("missing_text_column", f"no column {field!r}; columns: {schema.names}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        raise _SkipFile("missing_text_column", f"column {field!r} has type {kind}, not text")
    for batch in pfile.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                st.skipped["missing_text_field"] += 1
            else:
                yield value if isinstance(value, str) else decode_text(value, st.repairs)


def _file_texts(path: Path, field: str, limit: int, st: _FileState) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, field, st)
        return
    if path.stat().st_size == 0:
        raise _SkipFile("empty")
    with open(path, "rb") as f:
        if looks_binary(f.read(8192)):
            raise _SkipFile("binary")
        f.seek(0)
        if suffix in TEXT_SUFFIXES:
            yield from _read_text(path, f, limit, st)
        elif suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(f, field, limit, st)
        elif suffix == ".json":
            yield from _read_json(f, field, limit, st)
        elif suffix == ".csv":
            yield from _read_csv(path, field, limit, st)


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


def dangling_links(raw_dir: Path) -> list[Path]:
    """Symbolic links under `raw_dir` whose target is missing (DVC cannot hash the folder while one is there)."""
    found = [raw_dir] if raw_dir.is_symlink() and not raw_dir.exists() else []
    for root, dirs, files in os.walk(raw_dir):
        found += [Path(root, n) for n in dirs + files if Path(root, n).is_symlink() and not Path(root, n).exists()]
    return sorted(found)


def _read_file(
    path: Path, label: str, cfg: SourceConfig, tally: Tally, limit: int, st: _FileState
) -> Iterator[RawDocument]:
    try:
        for text in _file_texts(path, cfg.text_field, limit, st):
            yield RawDocument(text, label, cfg.lang, st.origin)
    except _SkipFile as skip:
        st.problem = skip.reason
        tally.skip_file(path, skip.reason, skip.detail)
    except (OSError, ValueError) as err:  # permissions, a path that vanished, a bad encoding
        st.problem = "unreadable"
        tally.skip_file(path, "unreadable", f"{type(err).__name__}: {err}")
    else:
        tally.files_read += 1
        with contextlib.suppress(OSError):
            tally.bytes_read += path.stat().st_size


def iter_file_documents(
    raw_dir: Path, cfg: SourceConfig, tally: Tally, limit: int, where: str = "prepare.sources"
) -> Iterator[RawDocument]:
    what = f"{where} (files {cfg.glob!r} under {raw_dir})"
    if not raw_dir.is_dir():
        tally.note(f"{what}: paths.raw {raw_dir} does not exist")
        return
    paths = list_raw_files(raw_dir, cfg.glob)
    if not paths:
        tally.note(f"{what}: the glob {cfg.glob!r} matches no file")
        return
    documents, keys, problems = 0, set(), Counter()
    for path in paths:
        if path.is_symlink() and not path.exists():
            tally.skip_file(path, "broken_symlink", f"a link to missing {os.readlink(path)}")
            problems["broken_symlink"] += 1
            continue
        if path.suffix.lower() not in SUPPORTED:
            tally.skip_file(path, "unsupported_extension", f"supported: {sorted(SUPPORTED)}")
            problems["unsupported_extension"] += 1
            continue
        st, before = _FileState(), documents
        for doc in _read_file(path, f"file:{path.relative_to(raw_dir).as_posix()}", cfg, tally, limit, st):
            documents += 1
            yield doc
        tally.repair(path, st.repairs)
        for reason, n in sorted(st.skipped.items()):
            tally.skip_records(path, reason, n)
        if documents == before and st.problem is None and not st.skipped:
            tally.skip_file(path, "no_documents")
        keys |= st.keys
        problems.update([st.problem] if st.problem else st.skipped)
    if documents == 0:
        found = f", found keys {sorted(keys)}" if keys else ""
        raise SourceError(
            f"{what}: {len(paths)} file(s) matched but gave no document (looked for text_field {cfg.text_field!r}"
            f"{found}; problems: {dict(problems)}). Set text_field to the key that holds the text, or fix the files"
        )


# ---------------------------------------------------------------- Hugging Face datasets and the built-in corpus


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


def iter_hf_documents(cfg: SourceConfig, tally: Tally, where: str = "prepare.sources") -> Iterator[RawDocument]:
    ds = _open_hf_dataset(cfg)
    label = f"hf:{cfg.name}" + (f"/{cfg.config}" if cfg.config else "") + f":{cfg.split}"
    what = f"{where} ({label})"
    names = getattr(ds, "column_names", None)
    if names is not None and cfg.text_field not in names:
        raise SourceError(f"{what}: no column {cfg.text_field!r} (text_field); columns: {names}. "
                          "Set text_field to the column that holds the text")
    documents, missing, keys = 0, 0, set()
    for row in ds:
        value = row.get(cfg.text_field)
        if isinstance(value, str):
            documents += 1
            yield RawDocument(value, label, cfg.lang)
        else:
            missing += 1
            keys.update(row)
    tally.files_read += 1
    tally.skip_records(label, "missing_text_field", missing)
    if documents == 0:
        raise SourceError(f"{what}: no document: {missing} row(s), none with text in {cfg.text_field!r} "
                          f"(text_field); keys found: {sorted(keys)}")


def iter_source(
    cfg: SourceConfig, raw_dir: Path, tally: Tally, limit: int, builtin_stats=None, where: str = "prepare.sources"
) -> Iterator[RawDocument]:
    """Documents of one configured source (`where` names it in messages: prepare.sources[i]), at most
    `cfg.max_documents`. Raises SourceError when a source that found input yields no document."""
    if cfg.kind == "builtin":
        from gpt.data.builtin import iter_builtin_documents

        docs: Iterator[RawDocument] = (
            RawDocument(text, source, cfg.lang) for source, text in iter_builtin_documents(builtin_stats)
        )
    elif cfg.kind == "files":
        docs = iter_file_documents(raw_dir, cfg, tally, limit, where)
    else:
        docs = iter_hf_documents(cfg, tally, where)
    return itertools.islice(docs, cfg.max_documents)
