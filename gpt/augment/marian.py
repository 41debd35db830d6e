"""Neural backend: any Hugging Face `transformers` seq2seq translation model (MarianMT / Opus-MT, NLLB, T5 ...).

`augment.marian.model` is a local directory holding the model and tokenizer (`save_pretrained` layout, e.g. a
downloaded `Helsinki-NLP/opus-mt-en-id`), or a hub name; a hub name is only fetched when `allow_download: true`
(otherwise only the local Hugging Face cache is used, so the pipeline never downloads behind your back).
`transformers` is imported lazily, so the other backends work without it.

Documents longer than the model's input limit are split at paragraph, then sentence, then word boundaries into
segments that fit; all segments of a batch of documents are translated together (sorted by length, so padding
stays small), and joined back: sentences with a space, paragraphs with the original blank lines. Code is cut
out first (protect.py) and copied; a neural model cannot be trusted to carry a placeholder through a sentence,
so the prose on each side of an inline code span is translated as its own piece.

Cached translations are keyed on a SHA-256 of every file of the model directory (weights included: retraining
that keeps the file names and sizes must not serve the old model's translations), and on the generation
settings. Hashing reads the weights once per run (~1 s per GB).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt.augment.base import BackendUnavailable, TranslationError
from gpt.augment.protect import translate_prose
from gpt.config import ConfigError

_PARAGRAPHS = re.compile(r"(\n\s*\n)")
_SENTENCES = re.compile(r"(?<=[.!?。])\s+")


@dataclass(frozen=True)
class MarianConfig:
    """`augment.marian`: model dir or hub name; generation settings (part of the cache key)."""

    model: str = "models/translation"  # a directory (save_pretrained layout), or a hub name outside DVC
    allow_download: bool = False
    device: str = "auto"  # auto = cuda when available, else cpu
    num_beams: int = 1
    max_input_tokens: int | None = None  # null = the model's own limit (capped at 512)
    segments_per_batch: int = 16

    def __post_init__(self):
        if not self.model:
            raise ConfigError("augment.marian.model: empty; give a local model directory (or a hub name)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"augment.marian.device: {self.device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        if self.num_beams < 1:
            raise ConfigError(f"augment.marian.num_beams: must be >= 1, got {self.num_beams}")
        if self.max_input_tokens is not None and self.max_input_tokens < 8:
            raise ConfigError(f"augment.marian.max_input_tokens: must be >= 8 or null, got {self.max_input_tokens}")
        if self.segments_per_batch < 1:
            raise ConfigError(f"augment.marian.segments_per_batch: must be >= 1, got {self.segments_per_batch}")


def content_hash(directory: Path) -> str:
    """SHA-256 over every file under `directory` (relative path + contents, in sorted order)."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = f.relative_to(directory).as_posix().encode()
        h.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _fingerprint(model: str, local_only: bool) -> str:
    """The content hash of the model's files: a local directory, or a hub model's snapshot in the local cache."""
    path = Path(model)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=local_only))
        except Exception as err:  # loading already succeeded, so this only happens for unusual hub setups
            raise BackendUnavailable(f"augment.marian.model: cannot find the files of {model!r} to fingerprint "
                                     f"them ({err}); download it to a local directory and name that") from err
    return content_hash(path)


class MarianTranslator:
    """Batched seq2seq translation on GPU when present; not thread-parallel (torch uses all cores itself)."""

    name = "marian"
    parallel = False

    def __init__(self, cfg: MarianConfig):
        try:
            import torch
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        except ImportError as err:
            raise BackendUnavailable(f"augment: the marian backend needs transformers ({err}); "
                                     "`pip install -e '.[dev]'`, or set augment.enabled: false") from err
        local = Path(cfg.model).is_dir()
        kwargs = {"local_files_only": not (cfg.allow_download or local)}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, **kwargs)
            self.net = AutoModelForSeq2SeqLM.from_pretrained(cfg.model, **kwargs)
        except (OSError, ValueError) as err:  # no or unrecognised model files
            raise BackendUnavailable(
                f"augment.marian.model: cannot load {cfg.model!r} ({str(err).splitlines()[0]}); put a model there "
                "(save_pretrained layout, see models/translation/README.md), name another directory, or set "
                "augment.marian.allow_download: true to fetch a hub model") from err
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        self.net.to(device).eval()
        self.torch = torch
        self.cfg = cfg
        limit = cfg.max_input_tokens or min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)
        self.max_tokens = min(limit, getattr(self.net.config, "max_position_embeddings", limit) or limit)
        self.model = cfg.model
        fingerprint = _fingerprint(cfg.model, kwargs["local_files_only"])
        self.version = f"{fingerprint}:beams={cfg.num_beams}:max={self.max_tokens}:code kept"

    def _max_new_tokens(self, input_tokens: int) -> int:
        """Room for a translation ~1.5x the input, within the decoder's position limit."""
        limit = getattr(self.net.config, "max_position_embeddings", None) or 1_000_000
        return max(1, min(int(input_tokens * 1.5) + 10, limit - 1))

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def split(self, text: str) -> list[str]:
        """Cut a paragraph into segments of at most `max_tokens` tokens, at sentence then word boundaries."""
        if self._length(text) <= self.max_tokens:
            return [text]
        pieces = _SENTENCES.split(text)
        if len(pieces) == 1:
            pieces = text.split()
            if len(pieces) == 1:
                return [text]  # one giant word: the tokenizer truncates it
        segments, current = [], ""
        for piece in pieces:
            candidate = f"{current} {piece}".strip()
            if current and self._length(candidate) > self.max_tokens:
                segments.extend(self.split(current) if self._length(current) > self.max_tokens else [current])
                current = piece
            else:
                current = candidate
        if current:
            segments.extend(self.split(current) if self._length(current) > self.max_tokens else [current])
        return segments

    def translate(self, texts: Sequence[str]) -> list[str]:
        return translate_prose(texts, self._translate_prose)

    def _translate_prose(self, texts: Sequence[str]) -> list[str]:
        layout = []  # per document: list of (separator, [segment indices]) per paragraph
        segments: list[str] = []
        for text in texts:
            doc = []
            parts = _PARAGRAPHS.split(text)
            for k in range(0, len(parts), 2):
                sep = parts[k - 1] if k else ""
                idx = []
                if parts[k].strip():
                    for seg in self.split(parts[k].strip()):
                        idx.append(len(segments))
                        segments.append(seg)
                doc.append((sep, idx))
            layout.append(doc)
        results = self._generate(segments)
        return ["".join(sep + " ".join(results[i] for i in idx) for sep, idx in doc) for doc in layout]

    def _generate(self, segments: list[str]) -> list[str]:
        order = sorted(range(len(segments)), key=lambda i: len(segments[i]))
        out = [""] * len(segments)
        step = self.cfg.segments_per_batch
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            enc = self.tokenizer([segments[i] for i in chunk], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_tokens).to(self.device)
            try:
                with self.torch.inference_mode():
                    gen = self.net.generate(**enc, num_beams=self.cfg.num_beams,
                                            max_new_tokens=self._max_new_tokens(enc["input_ids"].shape[1]))
            except RuntimeError as err:  # e.g. CUDA out of memory on a huge batch
                raise TranslationError("model_error", str(err)[:200]) from err
            for i, text in zip(chunk, self.tokenizer.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text.strip()
        return out
