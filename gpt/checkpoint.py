"""Model checkpoints: weights as safetensors + the resolved ModelConfig as JSON, never pickle.

A model directory holds `model.safetensors` (tied weights stored once) and `config.json`:
`{"format": "gpt-pipeline-model", "version": 1, "config": {...ModelConfig...}, "metadata": {...}}`.
Both files are written to temporary names and renamed into place, so a crash never leaves a half-written
checkpoint behind; other files in the directory (tokenizer, lineage) are left alone.
Loading checks that the weights match the config exactly and raises `CheckpointError` naming what differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.config import ConfigError
from gpt.errors import GptError
from gpt.model import DecoderOnlyTransformer, ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "gpt-pipeline-model"
VERSION = 1


class CheckpointError(GptError, RuntimeError):
    """A checkpoint directory is missing, malformed, or its weights do not fit its config."""


def _unique_state_dict(model: DecoderOnlyTransformer) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (the tied LM head is the token embedding)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: DecoderOnlyTransformer, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + config.json into `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _unique_state_dict(model)
    config_doc = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "metadata": metadata or {}}
    st_meta = {"format": FORMAT}  # one key: safetensors writes metadata in hash order, so more keys = unstable bytes

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config_doc, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata=st_meta))
    _atomic_write(directory / CONFIG_FILE, write_config)
    return directory


def _read_config_doc(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {directory} a model directory written by save_model?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        raise CheckpointError(f"{path}: not a {FORMAT} config (missing 'format'/'config')")
    if doc.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: format version {doc['version']} is newer than this code ({VERSION})")
    return doc


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig stored beside the weights."""
    directory = Path(directory)
    try:
        return ModelConfig.from_dict(_read_config_doc(directory)["config"], section=f"{directory / CONFIG_FILE}")
    except ConfigError as err:
        raise CheckpointError(f"invalid model config in {directory}: {err}") from err


def load_metadata(directory: str | Path) -> dict[str, Any]:
    return dict(_read_config_doc(Path(directory)).get("metadata") or {})


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> DecoderOnlyTransformer:
    """Build the model from config.json and load model.safetensors into it (eval mode)."""
    directory = Path(directory)
    config = load_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: not found")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: cannot read ({err})") from err
    with torch.device(device):
        model = DecoderOnlyTransformer(config)
    expected = _unique_state_dict(model)
    problems = _compare(expected, state)
    if problems:
        raise CheckpointError(f"{weights_path} does not match its config.json: " + "; ".join(problems))
    model.load_state_dict(state, strict=not config.tie_embeddings)
    stored_dtype = state["tok_embeddings.weight"].dtype
    model = model.to(dtype or stored_dtype)  # default: the dtype the weights were saved in
    return model.eval()


def _compare(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(found)):
        if expected[name].shape != found[name].shape:
            problems.append(f"{name}: shape {tuple(found[name].shape)} but config needs {tuple(expected[name].shape)}")
    return problems
