"""Persistent translation cache: (backend, model/direction, backend version, source-text hash) → translation.

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
direction and version that would produce it again.
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
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS translations ("
            " key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL, translation TEXT NOT NULL)"
        )
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, translation FROM translations WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def put_many(self, entries: Iterable[tuple[str, str, str, str]]) -> None:
        """Insert (key, backend, model, translation) rows in one transaction (all or nothing)."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?)", entries)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
