"""Apertium backend: rule-based machine translation through the `apertium` command (fully offline).

Install on Debian/Ubuntu with `apt-get install apertium apertium-eng-spa` (other pairs: `apertium -l` lists what
is installed). Measured facts this module relies on (Apertium 3.8.3, eng-spa 0.8.1; see tests/test_augment_apertium.py):
- With `-f txt` (the default format) markup-like characters (`< > [ ] \\ ^ $ @ * # /`) pass through as text, and
  blank-line separated paragraphs stay separate, with the same number of newlines between them.
- `-u` drops the `*` that marks unknown words; unknown words are copied unchanged.
- Starting the process costs ~0.1 s, so many documents go into one call, separated by a paragraph holding only
  `SEPARATOR` (an unknown word, copied unchanged). The output is split on it again; if the count of pieces does not
  match, the batch is retried one document per call, so a separator that got mangled never shifts documents.
- NUL bytes are dropped by the txt formatter (so `-z` null-flush mode cannot delimit documents); we strip them.
- Batching is not perfectly neutral: apertium's tagger adapts to the text it has already seen in the same process
  (not reset by sentence ends, the separator or `-z` flushes), so some words of a document may be translated
  differently depending on the documents before it in the call (measured: 22 of 60 pydoc topics differed in at
  least one word between batched and one-per-call). Batches are formed deterministically, so a run from the same
  cache state gives the same output; `augment.batch_size: 1` makes each translation depend only on its document
  (identical to a plain `apertium -u` call) at 3-5x the cost (bench/README.md).
Leading/trailing whitespace of each document is kept outside the call and re-attached, so texts round-trip
their layout exactly.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from gpt.augment.base import BackendUnavailable, TranslationError
from gpt.config import ConfigError

SEPARATOR = "ZQXDOCSEPZQX"
_SPLIT = re.compile(r"\s*" + SEPARATOR + r"\s*")
_EDGES = re.compile(r"^(\s*)(.*?)(\s*)$", re.DOTALL)
INSTALL_HINT = (
    "install it with `sudo apt-get install apertium apertium-{pair}` (Debian/Ubuntu; `make system-deps` does this), "
    "or disable translation with `augment.enabled: false` (or `augment.backend: none`) in params.yaml"
)

# ISO 639-1 → the ISO 639-3 codes apertium names its pairs with (extend as needed, or set augment.apertium.pair)
ISO3 = {"en": "eng", "es": "spa", "ca": "cat", "fr": "fra", "pt": "por", "it": "ita", "gl": "glg", "id": "ind",
        "ms": "zlm", "de": "deu", "nl": "nld", "eo": "epo", "oc": "oci", "ro": "ron", "eu": "eus"}


@dataclass(frozen=True)
class ApertiumConfig:
    """`augment.apertium`: `pair` overrides the direction derived from src_lang/tgt_lang (e.g. `eng-spa`)."""

    pair: str | None = None
    timeout_s: float = 300.0  # per process call; a call that takes longer is a failure for its documents

    def __post_init__(self):
        if self.pair is not None and not re.fullmatch(r"[a-z_A-Z]+-[a-z_A-Z-]+", self.pair):
            raise ConfigError(f"augment.apertium.pair: {self.pair!r} is not like 'eng-spa'")
        if self.timeout_s <= 0:
            raise ConfigError(f"augment.apertium.timeout_s: must be > 0, got {self.timeout_s}")


def pair_for(src_lang: str, tgt_lang: str) -> str:
    return f"{ISO3.get(src_lang, src_lang)}-{ISO3.get(tgt_lang, tgt_lang)}"


@functools.cache
def installed_pairs() -> tuple[str, ...]:
    if shutil.which("apertium") is None:
        return ()
    out = subprocess.run(["apertium", "-l"], capture_output=True, text=True, timeout=60)
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


@functools.cache
def _version(pair: str) -> str:
    """Engine + language-data version; an upgrade changes it, which invalidates cached translations."""
    engine = subprocess.run(["apertium", "-V"], capture_output=True, text=True).stdout.strip()
    data = ""
    if shutil.which("dpkg-query"):
        base = "apertium-" + "-".join(pair.split("-")[:2]).split("_")[0]
        for name in (base, "apertium-" + "-".join(reversed(pair.split("-")[:2]))):
            res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True)
            if res.returncode == 0 and res.stdout:
                data = f"{name} {res.stdout}"
                break
    return f"{engine}; {data}".strip("; ")


class ApertiumTranslator:
    """Translate with `apertium -u <pair>`, many documents per process call (thread-safe: one process per call)."""

    name = "apertium"
    parallel = True  # each call is its own process, so threads give real parallelism

    def __init__(self, pair: str, timeout_s: float = 300.0):
        if shutil.which("apertium") is None:
            raise BackendUnavailable("augment: the `apertium` program is not installed; " + INSTALL_HINT.format(pair=pair))
        if pair not in installed_pairs():
            raise BackendUnavailable(
                f"augment: apertium has no language pair {pair!r} (installed: {list(installed_pairs())}); "
                + INSTALL_HINT.format(pair=pair.split("_")[0])
            )
        self.model = pair
        self.version = _version(pair)
        self.timeout_s = timeout_s
        self.stats = {"process_calls": 0, "batch_fallbacks": 0}
        self._lock = threading.Lock()

    def translate(self, texts: Sequence[str]) -> list[str]:
        parts = [_EDGES.match(t.replace("\0", "")).groups() for t in texts]  # (lead, core, trail)
        out = [lead + core + trail for lead, core, trail in parts]
        todo = [i for i, (_, core, _) in enumerate(parts) if core]
        batchable = [i for i in todo if SEPARATOR not in parts[i][1]]
        alone = [i for i in todo if SEPARATOR in parts[i][1]]
        if batchable:
            joined = ("\n\n" + SEPARATOR + "\n\n").join(parts[i][1] for i in batchable)
            pieces = _SPLIT.split(self._run(joined).strip())
            if len(pieces) != len(batchable):
                with self._lock:
                    self.stats["batch_fallbacks"] += 1
                alone = batchable + alone
            else:
                for i, piece in zip(batchable, pieces):
                    out[i] = parts[i][0] + piece + parts[i][2]
        for i in alone:
            out[i] = parts[i][0] + self._run(parts[i][1]).strip() + parts[i][2]
        return out

    def _run(self, text: str) -> str:
        with self._lock:
            self.stats["process_calls"] += 1
        timeout = self.timeout_s + len(text) / 5000  # generous: apertium does ~80 kB/s per core
        try:
            res = subprocess.run(["apertium", "-u", "-f", "txt", self.model], input=text.encode("utf-8"),
                                 capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise TranslationError("timeout", f"apertium took over {timeout:.0f} s") from err
        if res.returncode != 0:
            msg = res.stderr.decode("utf-8", "replace").strip().splitlines()
            raise TranslationError("apertium_exit", f"exit {res.returncode}: {msg[-1] if msg else ''}")
        result = res.stdout.decode("utf-8", "replace")
        if text.strip() and not result.strip():
            raise TranslationError("empty_output", "apertium returned nothing")
        return result
