"""The translator interface every backend implements, and the two errors the pipeline distinguishes.

A translator turns a batch of texts into a batch of texts of the same length, in order. It raises
`TranslationError` for a failure that may be specific to these inputs (the pipeline retries, then falls back to
one document at a time and records the reason), and `BackendUnavailable` when it cannot work at all (not
installed, model missing) — then the stage stops with a message saying what to install or how to disable it.
"""

from __future__ import annotations

import shutil
import subprocess
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


def apt_packages(prefix: str) -> frozenset[str] | None:
    """The package names apt knows that start with `prefix` (one `apt-cache pkgnames` call); None without apt."""
    if shutil.which("apt-cache") is None:
        return None
    try:
        res = subprocess.run(["apt-cache", "pkgnames", prefix], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return frozenset(res.stdout.split()) if res.returncode == 0 else None


def install_hint(candidates: Sequence[str], what: str, prefix: str) -> str:
    """`install it with sudo apt-get install <the first candidate apt knows>`, or a sentence saying Debian has
    none of them (so a hint never names a package that does not exist)."""
    known = apt_packages(prefix)
    if known is None:  # no apt here: name the usual Debian package, unverified
        return f"install {what} (on Debian/Ubuntu the package would be named like {candidates[0]})"
    found = [name for name in candidates if name in known]
    if found:
        return f"install it with `sudo apt-get install {found[0]}`"
    return (f"Debian/Ubuntu have no package for {what} (none of {', '.join(candidates)} exists; `apt-cache search "
            f"{prefix.rstrip('-')}` lists what does, after `sudo apt-get update`)")
