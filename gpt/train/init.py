"""Starting from an existing model directory: `train.init_from` (continued pretraining) and the SFT stage's parent.

The parent is a directory `gpt.model_dir` reads — one the train stage wrote, or one `gpt import` made from Hugging
Face. What it decides, so that nothing silently disagrees with it:
- the architecture: the model config is the parent's. The `model:` params section may only repeat it: an override
  (or an explicit `model.vocab_size`) with another value is an error naming the key (`model.preset` is ignored);
- the tokenizer: the parent's (the tokenizer stage copies it, `copy_parent_tokenizer`); a tokenizer whose
  vocabulary does not fit the model is an error naming both sizes;
- the lineage: the child records the parent's path and the sha256 of its weights file (`ParentModel.record`), which
  also enters the run identity, so a checkpoint of another parent (or of a from-scratch run) is never resumed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from gpt.config import ConfigError
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import (
    WEIGHTS_FILE,
    ModelDirError,
    check_model_dir,
    load_config,
    load_model,
    quantization_info,
)
from gpt.tokenizer import TOKENIZER_FILE, copy_tokenizer, load_tokenizer
from gpt.train.checkpoints import file_digest


@dataclasses.dataclass(frozen=True)
class ParentModel:
    """A model directory training starts from. `key` is the params key that named it (for error messages)."""

    directory: Path
    config: ModelConfig
    weights_sha256: str
    key: str

    def record(self) -> dict[str, Any]:
        """What the child's lineage (and run identity) records about its parent."""
        return {"path": str(self.directory), "weights_sha256": self.weights_sha256}

    def load(self) -> DecoderOnlyTransformer:
        """The parent's weights as a float32 model in training mode."""
        return load_model(self.directory, dtype=torch.float32).train()


def parent_model(directory: str | Path, key: str = "train.init_from") -> ParentModel:
    """Check that `directory` is a full-precision model directory; a problem is one error naming `key`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{key}: model directory not found: {directory} (train a model or `gpt import` one there)")
    try:
        check_model_dir(directory)
        if quantization_info(directory) is not None:
            raise ModelDirError(f"{directory} is a quantized copy; start from the full-precision model")
        config = load_config(directory)
    except ModelDirError as err:
        raise ConfigError(f"{key}: {err}") from None
    return ParentModel(directory, config, file_digest(directory / WEIGHTS_FILE)["sha256"], key)


def parent_model_config(parent: ParentModel, model_section: dict[str, Any], tokenizer_vocab_size: int,
                        seq_len: int) -> ModelConfig:
    """The parent's config, after checking that the `model:` params section (flat form: preset, vocab_size and
    overrides) does not contradict it, that the tokenizer fits its vocabulary and `seq_len` its context."""
    config = parent.config
    for name, value in model_section.items():
        if name == "preset" or (name == "vocab_size" and value is None):
            continue
        if not hasattr(config, name):
            raise ConfigError(f"model.{name}: not a model config field")
        if getattr(config, name) != value:
            raise ConfigError(f"model.{name}: {value!r} contradicts the {parent.key} model's {name} = "
                              f"{getattr(config, name)!r} ({parent.directory}); the model section is taken from it: "
                              f"remove the override")
    if tokenizer_vocab_size > config.vocab_size:
        raise ConfigError(f"{parent.key}: vocabulary mismatch: the tokenizer has {tokenizer_vocab_size} tokens, the "
                          f"model in {parent.directory} has vocab_size {config.vocab_size} (re-run the tokenizer "
                          f"stage, which copies the model's own tokenizer)")
    if seq_len > config.max_seq_len:
        raise ConfigError(f"train.seq_len: {seq_len} exceeds the {parent.key} model's max_seq_len "
                          f"{config.max_seq_len}")
    return config


def check_parent_tokenizer(parent: ParentModel, tokenizer: Any) -> None:
    """The tokenizer in use must be the parent's own (same sha256); otherwise name both vocabulary sizes."""
    theirs = load_tokenizer(parent.directory)
    if theirs.sha256 != tokenizer.sha256:
        raise ConfigError(f"{parent.key}: the tokenizer in use ({tokenizer.vocab_size} tokens, sha256 "
                          f"{tokenizer.sha256[:12]}…) is not the one of {parent.directory} ({theirs.vocab_size} "
                          f"tokens, sha256 {theirs.sha256[:12]}…); re-run the tokenizer stage, which copies it")


def copy_parent_tokenizer(parent: ParentModel, out: Path) -> list[str]:
    """Copy the parent's tokenizer files into `out` (the tokenizer stage's output being filled).

    The pipeline's tokenize stage encodes with sentencepiece, so a parent with only a Hugging Face tokenizer.json
    (e.g. an imported GPT-2) is refused here with the reason."""
    if not (parent.directory / TOKENIZER_FILE).is_file():
        raise ConfigError(f"{parent.key}: {parent.directory} has no {TOKENIZER_FILE} (sentencepiece): the pipeline "
                          f"tokenizes with sentencepiece; a Hugging Face tokenizer.json alone cannot feed it")
    return copy_tokenizer(parent.directory, out)
