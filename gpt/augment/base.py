"""The translator interface every backend implements, and the two errors the pipeline distinguishes.

A translator turns a batch of texts into a batch of texts of the same length, in order. It raises
`TranslationError` for a failure that may be specific to these inputs (the pipeline retries, then falls back to
one document at a time and records the reason), and `BackendUnavailable` when it cannot work at all (not
installed, model missing) — then the stage stops with a message saying what to install or how to disable it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from gpt.errors import GptError


class TranslationError(RuntimeError):
    """Translating these texts failed; `reason` is a short, stable label counted in metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class BackendUnavailable(GptError, RuntimeError):
    """The backend cannot run here (missing program, language pair or model); the message says how to fix it."""


@runtime_checkable
class Translator(Protocol):
    """A batch of texts in → the same number of translated texts out, in order.

    `name` and `model` identify the backend in provenance columns and cache keys; `version` changes when the
    same model would translate differently (a package upgrade), which invalidates cached translations.
    `parallel` says whether several batches may run at once in threads (true for subprocess backends).
    """

    name: str
    model: str
    version: str
    parallel: bool

    def translate(self, texts: Sequence[str]) -> list[str]: ...


class IdentityTranslator:
    """Returns its input; the `none` backend, and a stand-in in tests."""

    name = "none"
    model = "identity"
    version = "1"
    parallel = False

    def translate(self, texts: Sequence[str]) -> list[str]:
        return list(texts)
