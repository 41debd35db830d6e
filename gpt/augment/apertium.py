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

Code is never translated (protect.py finds it). Block code (doctest, fenced, indented) cuts a document into prose
pieces that are translated as separate documents of the batch and put back around the untouched block. Inline code
stays in its sentence as an apertium *superblank*: the call runs apertium's own txt pipeline in three steps,
`apertium-destxt` → `apertium -f none` → `apertium-retxt` (exactly what `apertium -f txt` runs), and between the
first two each inline span, stood in for by a marker word, becomes `[marker]` — a superblank, which every stage of
the pipeline copies unchanged as formatting (the tagger and transfer never see it as a word). Measured: the marker
comes back exactly once, at the place of the span in the translated sentence; a marker lost or duplicated makes
that piece go alone, and then fail as `code_lost` (never emitted with the code altered).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from gpt.augment.base import BackendUnavailable, TranslationError, install_hint
from gpt.augment.protect import Segment, split_code
from gpt.config import ConfigError

SEPARATOR = "ZQXDOCSEPZQX"
_SPLIT = re.compile(r"\s*" + SEPARATOR + r"\s*")
_EDGES = re.compile(r"^(\s*)(.*?)(\s*)$", re.DOTALL)
MARKER_PREFIX = "ZQXC"  # inline-code stand-ins are ZQXC<n>ZQX: letters and digits, which destxt passes unescaped
DISABLE_HINT = "or disable translation with `augment.enabled: false` (or `augment.backend: none`) in params.yaml"

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
    """The apertium direction for two ISO 639-1 codes: the ISO 639-3 spelling (`eng-spa`), unless only the older
    two-letter spelling (`en-gl`, from packages such as apertium-en-gl) is installed."""
    iso3 = f"{ISO3.get(src_lang, src_lang)}-{ISO3.get(tgt_lang, tgt_lang)}"
    iso2 = f"{src_lang}-{tgt_lang}"
    return iso2 if iso2 in installed_pairs() and iso3 not in installed_pairs() else iso3


def package_hint(pair: str) -> str:
    """An install hint naming the Debian package that really provides `pair` (both directions live in one
    package, named after either order, in three- or two-letter codes), or saying that none does."""
    a, b = pair.split("_")[0].split("-")[:2]
    inv = {v: k for k, v in ISO3.items()}
    a2, b2 = inv.get(a, a), inv.get(b, b)
    names = [f"apertium-{a}-{b}", f"apertium-{b}-{a}", f"apertium-{a2}-{b2}", f"apertium-{b2}-{a2}"]
    return install_hint(list(dict.fromkeys(names)), f"the apertium pair {a}-{b}", "apertium-")


@functools.cache
def installed_pairs() -> tuple[str, ...]:
    if shutil.which("apertium") is None:
        return ()
    try:
        out = subprocess.run(["apertium", "-l"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendUnavailable(f"augment: `apertium -l` failed ({err}); reinstall apertium, {DISABLE_HINT}") from err
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
    return f"{engine}; {data}; code kept v1".strip("; ")


class ApertiumTranslator:
    """Translate with apertium's txt pipeline, many documents per call (thread-safe: own processes per call)."""

    name = "apertium"
    parallel = True  # each call is its own processes, so threads give real parallelism

    def __init__(self, pair: str, timeout_s: float = 300.0):
        if shutil.which("apertium") is None or shutil.which("apertium-destxt") is None:
            raise BackendUnavailable(f"augment: the `apertium` program is not installed; {package_hint(pair)}, "
                                     f"{DISABLE_HINT}")
        if pair not in installed_pairs():
            raise BackendUnavailable(
                f"augment: apertium has no language pair {pair!r} (installed: {list(installed_pairs())}); "
                f"{package_hint(pair)}, set augment.apertium.pair, use augment.backend: dictionary or marian, "
                f"{DISABLE_HINT}"
            )
        self.model = pair
        self.version = _version(pair)
        self.timeout_s = timeout_s
        self.stats = {"process_calls": 0, "batch_fallbacks": 0, "code_spans": 0}
        self._lock = threading.Lock()

    def translate(self, texts: Sequence[str]) -> list[str]:
        texts = [t.replace("\0", "") for t in texts]
        prefix = MARKER_PREFIX
        while any(prefix in t for t in texts):  # a text that contains the marker shape: make it longer
            prefix += "Q"
        pieces: list[tuple[str, str, str]] = []  # (lead, core with inline markers, trail)
        codes: list[dict[str, str]] = []  # per piece: marker → inline code
        plans = [self._plan(t, prefix, pieces, codes) for t in texts]
        done = self._translate_pieces(pieces, codes, prefix)
        return ["".join(done[p] if isinstance(p, int) else p.text for p in plan) for plan in plans]

    def _plan(self, text: str, prefix: str, pieces: list, codes: list) -> list[Segment | int]:
        """Block code stays as it is; each stretch of prose between blocks becomes a piece (index into pieces)."""
        plan: list[Segment | int] = []
        stretch: list[Segment] = []
        for seg in [*split_code(text), Segment("", "block")]:
            if seg.kind != "block":
                stretch.append(seg)
                continue
            if stretch:
                inline: dict[str, str] = {}
                masked = []
                for part in stretch:
                    if part.kind == "inline":
                        marker = f"{prefix}{sum(map(len, codes)) + len(inline)}ZQX"
                        inline[marker] = part.text
                        masked.append(marker)
                    else:
                        masked.append(part.text)
                lead, core, trail = _EDGES.match("".join(masked)).groups()
                plan.append(len(pieces))
                pieces.append((lead, core, trail))
                codes.append(inline)
                stretch = []
            plan.append(seg)
        return plan

    def _translate_pieces(self, pieces: list[tuple[str, str, str]], codes: list[dict[str, str]],
                          prefix: str) -> list[str]:
        out = [lead + _restore(core, inline) + trail for (lead, core, trail), inline in zip(pieces, codes)]
        todo = [i for i, (_, core, _) in enumerate(pieces) if core.strip() and core not in codes[i]]
        batchable = [i for i in todo if SEPARATOR not in pieces[i][1]]
        alone = [i for i in todo if SEPARATOR in pieces[i][1]]
        if batchable:
            joined = ("\n\n" + SEPARATOR + "\n\n").join(pieces[i][1] for i in batchable)
            translated = _SPLIT.split(self._run(joined, prefix).strip())
            if len(translated) != len(batchable):
                with self._lock:
                    self.stats["batch_fallbacks"] += 1
                alone = batchable + alone
            else:
                for i, piece in zip(batchable, translated):
                    restored = _restore(piece, codes[i])
                    if restored is None:
                        alone.append(i)
                    else:
                        out[i] = pieces[i][0] + restored + pieces[i][2]
        for i in alone:
            restored = _restore(self._run(pieces[i][1], prefix).strip(), codes[i])
            if restored is None:
                raise TranslationError("code_lost", "apertium did not return an inline code span exactly once")
            out[i] = pieces[i][0] + restored + pieces[i][2]
        with self._lock:
            self.stats["code_spans"] += sum(map(len, codes))
        return out

    def _run(self, text: str, prefix: str) -> str:
        """apertium's txt pipeline (destxt | apertium -f none | retxt), inline-code markers made superblanks."""
        with self._lock:
            self.stats["process_calls"] += 1
        timeout = self.timeout_s + len(text) / 5000  # generous: apertium does ~80 kB/s per core
        stream = self._call(["apertium-destxt"], text, timeout)
        stream = re.sub(re.escape(prefix) + r"\d+ZQX", r"[\g<0>]", stream)
        stream = self._call(["apertium", "-u", "-f", "none", self.model], stream, timeout)
        result = self._call(["apertium-retxt"], stream, timeout)
        if text.strip() and not result.strip():
            raise TranslationError("empty_output", "apertium returned nothing")
        return result

    @staticmethod
    def _call(cmd: list[str], text: str, timeout: float) -> str:
        try:
            res = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise TranslationError("timeout", f"{cmd[0]} took over {timeout:.0f} s") from err
        if res.returncode != 0:
            msg = res.stderr.decode("utf-8", "replace").strip().splitlines()
            raise TranslationError("apertium_exit", f"{cmd[0]} exit {res.returncode}: {msg[-1] if msg else ''}")
        return res.stdout.decode("utf-8", "replace")


def _restore(translated: str, inline: dict[str, str]) -> str | None:
    """Put each inline code span back in place of its marker; None when a marker is missing or repeated."""
    if any(translated.count(marker) != 1 for marker in inline):
        return None
    for marker, code in inline.items():
        translated = translated.replace(marker, code)
    return translated
