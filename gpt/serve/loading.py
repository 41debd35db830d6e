"""Load a model directory for inference: weights (plain, bf16/fp16 or INT8-quantized), its tokenizer, and the
facts `gpt info` reports (config, lineage, size on disk).

A model directory is what the train stage writes to `paths.model` (`model.safetensors`, `config.json`,
`tokenizer.model`, `lineage.json`), what `gpt quantize` writes (the same plus `quantization.json`), or what
`gpt import --from hf` writes (a `tokenizer.json` instead of `tokenizer.model` when the source had no
sentencepiece model). Every error names the missing file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from gpt.errors import GptError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SP_TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
LINEAGE_FILE = "lineage.json"
QUANTIZATION_FILE = "quantization.json"


class ModelDirError(GptError, FileNotFoundError):
    """The model directory (or a file in it) is missing or unusable; the message names the path."""


class HFTokenizer:
    """Our tokenizer interface over a Hugging Face `tokenizer.json` (for models imported from HF without a
    sentencepiece model)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTok

        self.path = Path(path)
        self._tok = HFTok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(self.path.parent / "tokenizer_config.json") or {}
        # like transformers' split_special_tokens: "<s>" typed in a prompt is text, not the control token
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
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

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_model_dir(directory: str | Path) -> Path:
    """Fail with a message naming what is missing unless `directory` holds weights and a config."""
    directory = Path(directory)
    if not directory.exists():
        raise ModelDirError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise ModelDirError(f"--checkpoint must be a directory (with {MODEL_FILE} and {CONFIG_FILE}): {directory}")
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise ModelDirError(f"missing {directory / name} (is this a model directory?)")
    return directory


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer stored with the model: sentencepiece `tokenizer.model`, else HF `tokenizer.json`."""
    directory = Path(directory)
    if (directory / SP_TOKENIZER_FILE).is_file():
        from gpt.tokenizer import Tokenizer

        return Tokenizer.load(directory / SP_TOKENIZER_FILE)
    if (directory / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(directory / HF_TOKENIZER_FILE)
    raise ModelDirError(f"missing {directory / SP_TOKENIZER_FILE} (no tokenizer stored with the model)")


def quantization_info(directory: str | Path) -> dict[str, Any] | None:
    return _read_json(Path(directory) / QUANTIZATION_FILE)


def load_weights(directory: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The model in eval mode: quantized directories through gpt.quantize, plain ones through gpt.checkpoint."""
    directory = check_model_dir(directory)
    if quantization_info(directory) is not None:
        from gpt.quantize import load_quantized

        model = load_quantized(directory, device=device)
    else:
        from gpt.checkpoint import load_model

        model = load_model(directory, device=device)
    return model.eval()


@dataclasses.dataclass
class LoadedModel:
    """Everything generation needs, plus a name to show (`/v1/models`)."""

    model: torch.nn.Module
    tokenizer: Any
    directory: Path
    name: str

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.max_seq_len)


def load_for_inference(directory: str | Path, device: str = "cpu", name: str | None = None) -> LoadedModel:
    directory = check_model_dir(directory)
    tokenizer = load_tokenizer(directory)
    model = load_weights(directory, device=device)
    vocab = int(model.config.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise ModelDirError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} pieces but the model only {vocab} (wrong tokenizer?)"
        )
    return LoadedModel(model, tokenizer, directory, name or directory.resolve().name)


def dir_size_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def describe(directory: str | Path) -> dict[str, Any]:
    """What `gpt info` prints: config, parameter count, tokenizer, lineage, quantization, size on disk."""
    loaded = load_for_inference(directory)
    model, tok = loaded.model, loaded.tokenizer
    lineage = _read_json(loaded.directory / LINEAGE_FILE)
    info: dict[str, Any] = {
        "checkpoint": str(loaded.directory),
        "config": model.config.to_dict(),
        "parameters": int(sum(p.numel() for p in model.parameters()) + _packed_params(model)),
        "quantization": quantization_info(loaded.directory),
        "tokenizer": {
            "file": SP_TOKENIZER_FILE if (loaded.directory / SP_TOKENIZER_FILE).is_file() else HF_TOKENIZER_FILE,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "sha256": tok.sha256,
        },
        "lineage": lineage,
        "size_on_disk_bytes": dir_size_bytes(loaded.directory),
        "files": {p.name: p.stat().st_size for p in sorted(loaded.directory.iterdir()) if p.is_file()},
    }
    if lineage and lineage.get("tokenizer_sha256"):
        info["tokenizer"]["matches_lineage"] = lineage["tokenizer_sha256"] == tok.sha256
    return info


def _packed_params(model: torch.nn.Module) -> int:
    """Weights held by INT8 modules as buffers, not parameters (a tied LM head counts once, as the embedding)."""
    tied = bool(getattr(model.config, "tie_embeddings", False))
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "num_weight_elements") and not (tied and name == "lm_head"):
            bias = getattr(module, "bias", None)
            total += int(module.num_weight_elements) + (bias.numel() if bias is not None else 0)
    return total
