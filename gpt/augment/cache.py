"""Persistent translation cache: (backend, model/direction, version + batching, source-text hash) → translation.

Why SQLite in its own directory (`paths.translation_cache`) instead of a DVC output:
- DVC deletes a stage's outputs before re-running it, so a cache declared as an output would be gone exactly
  when it is needed (after adding documents). `persist: true` keeps it, but then the output's hash changes on
  every run and the lock file churns; DVC's run-cache only helps when *all* inputs are unchanged.
- A separate, untracked directory survives any re-run, is shared by `dvc exp run` experiments in the same
  workspace, and translating one new document costs one new row, not a new cache version.
- SQLite gives atomic, crash-safe commits (a killed run keeps every batch it committed) and safe concurrent
  use by several processes, with no extra dependency. One row per translated text; keys are SHA-256 digests.
The directory gets a `.gitignore` of `*` so it never lands in git; delete the directory to start afresh.
Cache entries never change pipeline outputs: a translation is looked up only under the exact backend, model,
direction, version and batching that would produce it again. Failures are cached too (table `failures`), so a
rerun on the same data and params gives the same corpus and the same failure count instead of retrying them;
`augment.retry_failed: true` sends them to the backend again.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

CACHE_FILE = "translations.sqlite"


def text_key(backend: str, model: str, version: str, text: str) -> str:
    """SHA-256 over the length-prefixed fields, so ("ab","c") and ("a","bc") never collide."""
    h = hashlib.sha256()
    for field in (backend, model, version, text):
        data = field.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class TranslationCache:
    """A dict-like store of translations in `<directory>/translations.sqlite`; used from one thread."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        ignore = self.directory / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# translation cache (see gpt/augment/cache.py): never commit\n*\n")
        self.path = self.directory / CACHE_FILE
        self._db = sqlite3.connect(self.path, timeout=60.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        for table, value in (("translations", "translation"), ("failures", "reason")):
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                f" key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL, {value} TEXT NOT NULL)"
            )
        self._db.commit()

    def _get(self, table: str, value: str, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, {value} FROM {table} WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """key → translation, for the keys that have one."""
        return self._get("translations", "translation", keys)

    def get_failures(self, keys: Sequence[str]) -> dict[str, str]:
        """key → failure reason, for the keys whose translation failed before (and has not succeeded since)."""
        return self._get("failures", "reason", keys)

    def put_many(self, entries: Iterable[tuple[str, str, str, str]],
                 failures: Iterable[tuple[str, str, str, str]] = ()) -> None:
        """Insert (key, backend, model, translation) rows and (key, backend, model, reason) failures in one
        transaction (all or nothing); a translation clears an earlier failure of the same key."""
        entries = list(entries)
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?)", entries)
            self._db.executemany("DELETE FROM failures WHERE key = ?", [(e[0],) for e in entries])
            self._db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", failures)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
