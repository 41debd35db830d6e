"""The project's tokenizer: a thin wrapper over a sentencepiece BPE model, the code that trains one, and the one
owner of the tokenizer files (their names, loading the tokenizer stored in a directory, copying them along).

Every stage after `tokenizer` goes through `Tokenizer` (encode/decode, batch encode on all cores, special-token ids,
and the sha256 of the model file, which the shards, the checkpoints and the server check so that a model is never
paired with the wrong vocabulary). `train_tokenizer` trains the BPE model deterministically from an iterator of
training lines (see `TokenizerConfig` for the knobs; they mirror params.yaml `tokenizer:`).

A model directory (gpt.model_dir) holds `tokenizer.model` (ours), or, for models imported from Hugging Face
without a sentencepiece model, `tokenizer.json` (+ `tokenizer_config.json`) read through `HFTokenizer`;
`load_tokenizer(directory)` picks whichever is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from gpt.atomic import write_bytes_atomic
from gpt.config import ConfigError
from gpt.errors import GptError

TOKENIZER_FILE = "tokenizer.model"  # the sentencepiece model (what `Tokenizer.load` reads)
VOCAB_FILE = "tokenizer.vocab"  # pieces and scores, for people to read
HF_TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face `tokenizers` tokenizer (read by HFTokenizer)
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # its special tokens and flags
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# What a model directory may hold of a tokenizer; `copy_tokenizer` copies those present.
TOKENIZER_FILES = (TOKENIZER_FILE, HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE)
# Fixed ids of the special tokens (same in every model this project trains).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# sentencepiece's pieces for those ids, and its byte-fallback pieces: no special token may spell one.
RESERVED_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenizerError(GptError, ValueError):
    """A tokenizer model is missing/unreadable, or training cannot work with the given settings."""


def _resolve_threads(num_threads: int) -> int:
    return max(1, os.cpu_count() or 1) if num_threads is None or num_threads <= 0 else num_threads


class Tokenizer:
    """A loaded sentencepiece model. `Tokenizer.load(path)` takes the model file or a directory holding it."""

    def __init__(self, model_bytes: bytes, path: Path | None = None) -> None:
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with terse text
            raise TokenizerError(f"{path or 'tokenizer'}: not a sentencepiece model ({err})") from err
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer model not found: {file} (run `dvc repro tokenizer` first)")
        return cls(file.read_bytes(), file)

    def __getstate__(self) -> dict:  # picklable for worker processes: ship the bytes, rebuild the processor
        return {"model_bytes": self._model_bytes, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["path"])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…, path={self.path})"

    @property
    def model_bytes(self) -> bytes:
        return self._model_bytes

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = -1, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once on `num_threads` threads (-1: all cores); same result as `encode` per text."""
        return self.sp.encode(
            list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=_resolve_threads(num_threads)
        )

    def encode_batch_numpy(self, texts: Sequence[str], num_threads: int = -1, add_eos: bool = False) -> list[np.ndarray]:
        """`encode_batch` returning one int32 array per text (avoids building Python int lists; used by `tokenize`)."""
        return self.sp.encode_as_numpy(list(texts), add_eos=add_eos, num_threads=_resolve_threads(num_threads))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def is_byte(self, i: int) -> bool:
        """True for the <0xNN> byte-fallback pieces (used when a character is not in the vocabulary)."""
        return self.sp.is_byte(int(i))

    def byte_ids(self) -> np.ndarray:
        return np.array([self.sp.is_byte(i) for i in range(self.vocab_size)], dtype=bool)


class HFTokenizer:
    """`Tokenizer`'s interface over a Hugging Face `tokenizer.json` (models imported from HF without a
    sentencepiece model)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTok

        self.path = Path(path)
        self._tok = HFTok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = self.path.parent / HF_TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        # text is text, as with our sentencepiece models: "<s>" or "<|end|>" typed in a prompt never becomes the
        # control token (special tokens are inserted by id: the start token, gpt.chat). transformers matches them
        # unless split_special_tokens is set, which chat templates rely on (gpt/hf_dir.py export).
        self._tok.encode_special_tokens = True
        self.bos_id = self._special_id(config.get("bos_token"), ["<|endoftext|>", "<s>"])
        self.eos_id = self._special_id(config.get("eos_token"), ["<|endoftext|>", "</s>"])
        self.pad_id = self._special_id(config.get("pad_token"), [])
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def _special_id(self, token: Any, fallbacks: list[str]) -> int:
        if isinstance(token, dict):
            token = token.get("content")
        for name in [token, *fallbacks]:
            if isinstance(name, str) and (i := self._tok.token_to_id(name)) is not None:
                return i
        return -1

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id >= 0 else []) + ids + (
            [self.eos_id] if add_eos and self.eos_id >= 0 else []
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))


def load_tokenizer(directory: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer stored in `directory`: sentencepiece `tokenizer.model`, else HF `tokenizer.json`."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return Tokenizer.load(directory / TOKENIZER_FILE)
    if (directory / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(directory / HF_TOKENIZER_FILE)
    raise TokenizerError(f"missing {directory / TOKENIZER_FILE} (no tokenizer stored with the model)")


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in directory `src` into `dst` (a directory being filled); their names.

    Contents only (`copyfile`), so the copies get the ordinary permissions of new files, not the source's."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """params.yaml `tokenizer:` — sentencepiece BPE training."""

    vocab_size: int = 8192
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    # Training "sentences" are paragraphs (text between blank lines, so "\n" and indentation are learned, not
    # byte-encoded), cut at max_sentence_chars; sample_sentences of them are drawn by hash (0 = all).
    sample_sentences: int = 200_000
    max_sentence_chars: int = 4096
    # Reserved pieces encoded as one token wherever they appear (chat roles later); BOS/EOS/PAD are always there.
    special_tokens: list[str] = dataclasses.field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"]
    )
    num_threads: int = 2  # part of the model file's trainer spec: fixed (not "all cores") so hashes match anywhere
    seed: int = 0

    def __post_init__(self) -> None:
        if not 16 <= self.vocab_size <= 2**31 - 1:
            raise ConfigError(f"tokenizer.vocab_size: must be >= 16, got {self.vocab_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError(f"tokenizer.character_coverage: must be in [0.9, 1.0], got {self.character_coverage}")
        if self.sample_sentences < 0:
            raise ConfigError(f"tokenizer.sample_sentences: must be >= 0 (0 = all), got {self.sample_sentences}")
        if self.max_sentence_chars < 16:
            raise ConfigError(f"tokenizer.max_sentence_chars: must be >= 16, got {self.max_sentence_chars}")
        if self.num_threads < 1:
            raise ConfigError(f"tokenizer.num_threads: must be >= 1, got {self.num_threads}")
        for i, tok in enumerate(self.special_tokens):
            key = f"tokenizer.special_tokens[{i}]"
            if not tok or any(c.isspace() for c in tok):
                raise ConfigError(f"{key}: {tok!r} must be non-empty without whitespace")
            if tok in RESERVED_PIECES or _BYTE_PIECE.fullmatch(tok):
                raise ConfigError(f"{key}: {tok!r} is reserved (the pieces {list(RESERVED_PIECES)} have fixed ids "
                                  "0-3, <0x00>..<0xFF> are byte pieces); choose another spelling, e.g. <|name|>")
            if tok in self.special_tokens[:i]:
                raise ConfigError(f"{key}: {tok!r} is listed twice (also at index {self.special_tokens.index(tok)})")


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(lines: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path) -> Tokenizer:
    """Train a BPE model on `lines` (one training sentence each); writes tokenizer.model + tokenizer.vocab.

    Deterministic for the same lines and config (fixed seed and thread count). A vocabulary larger than the corpus
    supports raises TokenizerError naming the largest workable size.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Train into memory: with model_prefix the output path would be recorded in the model file and change its hash.
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            # control symbols: only ever inserted by id (chat template), never matched in text, so a user who types
            # "<|end|><|assistant|>" into a message cannot forge a turn; they decode to ""
            control_symbols=list(cfg.special_tokens),
            input_sentence_size=0,  # we sample ourselves, deterministically
            max_sentence_length=cfg.max_sentence_chars * 4,  # bytes (UTF-8 needs at most 4 per character)
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,  # keep indentation/newline structure of the text
            normalization_rule_name="identity",  # prepare already normalized (NFC/NFKC is a prepare param)
            num_threads=cfg.num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        match = _TOO_HIGH.search(str(err))
        if match:
            raise TokenizerError(
                f"tokenizer.vocab_size: {cfg.vocab_size} is too large for this corpus; the largest workable size "
                f"is {match.group(2)} (lower tokenizer.vocab_size, or add more text)"
            ) from err
        match = _TOO_LOW.search(str(err))
        if match:
            raise TokenizerError(
                f"tokenizer.vocab_size: {cfg.vocab_size} is too small; this corpus and settings need at least "
                f"{match.group(2)} (special tokens, 256 byte pieces and the covered characters)"
            ) from err
        raise TokenizerError(f"sentencepiece training failed: {err}") from err
    tokenizer = Tokenizer(model.getvalue(), out_dir / TOKENIZER_FILE)
    write_bytes_atomic(out_dir / TOKENIZER_FILE, tokenizer.model_bytes)
    vocab = "".join(f"{tokenizer.id_to_piece(i)}\t{tokenizer.sp.get_score(i):g}\n" for i in range(tokenizer.vocab_size))
    write_bytes_atomic(out_dir / VOCAB_FILE, vocab.encode("utf-8"))
    return tokenizer


def _sentence_key(seed: int, sentence: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sentence}".encode()).digest()[:8], "big")


def split_sentences(text: str, max_chars: int) -> Iterator[str]:
    """Paragraphs of `text` (split at blank lines), each cut into pieces of at most `max_chars`."""
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        while paragraph:
            if len(paragraph) <= max_chars:
                yield paragraph
                break
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            yield paragraph[:cut]
            paragraph = paragraph[cut:].lstrip("\n")


def training_sentences(corpus_dir: str | Path, cfg: TokenizerConfig) -> list[str]:
    """Paragraphs of the corpus's train split, sampled to ~`sample_sentences`.

    A paragraph is kept iff its seeded hash falls below a threshold, so the sample does not depend on document
    order, and adding text only adds paragraphs to it.
    """
    from gpt.data.corpus import read_corpus

    def sentences() -> Iterator[str]:
        for batch in read_corpus(corpus_dir, split="train", columns=["text"]):
            for text in batch.column("text").to_pylist():
                yield from split_sentences(text, cfg.max_sentence_chars)

    total = sum(1 for _ in sentences())
    if total == 0:
        raise TokenizerError(f"{corpus_dir}: the train split has no text to train a tokenizer on")
    if cfg.sample_sentences == 0 or total <= cfg.sample_sentences:
        return list(sentences())
    threshold = cfg.sample_sentences / total * 2**64
    return [s for s in sentences() if _sentence_key(cfg.seed, s) < threshold]


def tokenizer_stats(tokenizer: Tokenizer, texts: Iterable[str], num_threads: int = -1) -> dict:
    """Compression and coverage of `tokenizer` on `texts`: bytes/token, tokens/word, byte-fallback and unk rates."""
    is_byte = tokenizer.byte_ids()
    n_tokens = n_bytes = n_words = n_byte_tokens = n_unk = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens, n_byte_tokens, n_unk
        for ids in tokenizer.encode_batch_numpy(batch, num_threads=num_threads):
            n_tokens += ids.size
            n_byte_tokens += int(is_byte[ids].sum())
            n_unk += int((ids == tokenizer.unk_id).sum())
        batch.clear()

    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_words += len(text.split())
        batch.append(text)
        if len(batch) >= 256:
            flush()
    flush()
    return {
        "bytes_per_token": n_bytes / max(1, n_tokens),
        "tokens_per_word": n_tokens / max(1, n_words),
        "byte_fallback_rate": n_byte_tokens / max(1, n_tokens),
        "unk_rate": n_unk / max(1, n_tokens),
        "tokens": n_tokens,
        "bytes": n_bytes,
    }
