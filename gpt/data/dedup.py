"""Deduplication for `prepare`: exact (content hash) and near-duplicate (MinHash LSH over word shingles).

Both are streaming and keep the *first* occurrence in input order, so the result is deterministic. Memory grows
with the number of kept documents (a 16-byte digest each, plus `num_perm` hash values per document for LSH) —
a few hundred bytes per document, not the text. MinHash and LSH come from `datasketch` (Broder 1997; the banding
scheme of Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from gpt.config import ConfigError

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of shingle sets at which a document is a near-duplicate
    num_perm: int = 128
    shingle_words: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"prepare.dedup.threshold: must be in (0, 1), got {self.threshold}")
        if self.num_perm < 16:
            raise ConfigError(f"prepare.dedup.num_perm: must be >= 16, got {self.num_perm}")
        if self.shingle_words < 1:
            raise ConfigError(f"prepare.dedup.shingle_words: must be >= 1, got {self.shingle_words}")


def content_id(text: str) -> str:
    """Stable document id: the first 128 bits of the text's SHA-256, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def shingles(text: str, n: int) -> set[bytes]:
    """Lower-cased word n-grams (a text shorter than n words is one shingle)."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


class Deduplicator:
    """`is_duplicate(text)` → None for a new document (which is then remembered), else "exact" or "near"."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self._seen: set[bytes] = set()
        self._lsh = None
        self._kept = 0
        if cfg.near:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)

    def minhash(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        m.update_batch(sorted(shingles(text, self.cfg.shingle_words)))
        return m

    def is_duplicate(self, text: str) -> str | None:
        digest = hashlib.sha256(text.encode("utf-8")).digest()[:16]
        if self.cfg.exact and digest in self._seen:
            return "exact"
        signature = None
        if self._lsh is not None:
            signature = self.minhash(text)
            if self._lsh.query(signature):
                return "near"
        self._seen.add(digest)
        if signature is not None:
            self._lsh.insert(str(self._kept), signature)
        self._kept += 1
        return None
