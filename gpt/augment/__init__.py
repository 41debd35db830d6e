"""Offline translation augmentation: grow the training split with machine-translated copies of documents.

Pieces, each small and swappable:
  base.py        the `Translator` interface (a batch of texts in → a batch out) and its errors
  apertium.py    rule-based MT through the `apertium` command (Debian packages), batched per process call
  marian.py      any Hugging Face seq2seq translation model (MarianMT, Opus-MT, ...) from a local directory
  dictionary.py  word-by-word substitution from a FreeDict/dictd dictionary: noisy, for pairs with no MT engine
  cache.py       persistent SQLite translation cache that survives re-runs (outside DVC's outputs)
  pipeline.py    `AugmentConfig` + `augment_corpus`: selection, leakage guard, retries, provenance, metrics
"""

from gpt.augment.base import BackendUnavailable, TranslationError, Translator
from gpt.augment.pipeline import AugmentConfig, augment_corpus, make_translator

__all__ = ["AugmentConfig", "BackendUnavailable", "TranslationError", "Translator", "augment_corpus", "make_translator"]
