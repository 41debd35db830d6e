"""The trained-model directory: the one module that knows its layout, writes it (atomically, through gpt.atomic)
and reads it. Everyone else calls these functions; no other module spells these file names.

  model.safetensors   the weights, tied LM head stored once (INT8 copies: int8 + float32 `_scale` tensors)
  config.json         {"format": "gpt-pipeline-model", "version": 1, "config": {ModelConfig}, "metadata": {...}}
  tokenizer.model     the sentencepiece model it was trained with (gpt.tokenizer owns the tokenizer files;
                      a model imported from Hugging Face may hold `tokenizer.json` instead)
  lineage.json        where it came from (`Lineage`): tokenizer sha256, shard manifest hashes, step, val loss, params
  quantization.json   only in the copies `save_quantized` writes: dtype, method, which tensors are INT8

Writers: `write_model_dir` (the train stage's `paths.model`, the whole directory at once), `save_quantized`
(`gpt quantize`), `save_model` (weights + config only: training checkpoints, gpt.hf_dir's import).
Readers: `load_model` (the model of any variant), `load` (model + tokenizer + lineage, for the CLI and the server),
`describe` (`gpt info`), `read_lineage`. Weights are safetensors and configs JSON, never pickle; loading checks that
the weights match the config exactly and raises ModelDirError naming the file and what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.atomic import atomic_directory, remove_stale_temps, write_atomic, write_json_atomic
from gpt.config import ConfigError
from gpt.errors import GptError
from gpt.inference import prepare_for_inference
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.tokenizer import (
    HF_TOKENIZER_FILE,
    TOKENIZER_FILE,
    HFTokenizer,
    Tokenizer,
    copy_tokenizer,
    load_tokenizer,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"
QUANTIZATION_FILE = "quantization.json"
TOKENIZER_FILES = (TOKENIZER_FILE, HF_TOKENIZER_FILE)  # gpt.tokenizer's names: one of them, beside the weights
FORMAT = "gpt-pipeline-model"
VERSION = 1
QUANTIZED_FORMAT = "gpt-pipeline-quantized"
QUANTIZED_VERSION = 1


class ModelDirError(GptError, RuntimeError):
    """A model directory (or a file in it) is missing, malformed, or its weights do not fit its config."""


# ---------------------------------------------------------------- weights + config.json
def weights_state_dict(model: DecoderOnlyTransformer) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (the tied LM head is the token embedding)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _config_doc(config: ModelConfig, metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "metadata": metadata or {}}


def save_model(model: DecoderOnlyTransformer, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + config.json into `directory` (created if needed; each file atomically, other
    files left alone); returns the directory. Same weights and metadata give the same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = weights_state_dict(model)
    st_meta = {"format": FORMAT}  # one key: safetensors writes metadata in hash order, so more keys = unstable bytes
    write_atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata=st_meta))
    write_json_atomic(directory / CONFIG_FILE, _config_doc(model.config, metadata))
    return directory


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from err
    except OSError as err:
        raise ModelDirError(f"{path}: cannot read ({err})") from err


def _read_config_doc(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelDirError(f"{path}: not found (is {directory} a model directory written by save_model?)")
    doc = _read_json(path)
    if isinstance(doc, dict) and "model_type" in doc and "format" not in doc:  # transformers' config.json
        raise ModelDirError(f"{directory} is a Hugging Face model directory (model_type {doc['model_type']!r}); "
                            f"convert it first: gpt import --from hf {directory} -o <new model dir>")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        raise ModelDirError(f"{path}: not a {FORMAT} config (missing 'format'/'config')")
    if doc.get("version", 0) > VERSION:
        raise ModelDirError(f"{path}: format version {doc['version']} is newer than this code ({VERSION})")
    return doc


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig stored beside the weights."""
    directory = Path(directory)
    try:
        return ModelConfig.from_dict(_read_config_doc(directory)["config"], section=f"{directory / CONFIG_FILE}")
    except ConfigError as err:
        raise ModelDirError(f"invalid model config in {directory}: {err}") from err


def load_metadata(directory: str | Path) -> dict[str, Any]:
    return dict(_read_config_doc(Path(directory)).get("metadata") or {})


def _read_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ModelDirError(f"{path}: not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ModelDirError(f"{path}: cannot read ({err})") from err


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> DecoderOnlyTransformer:
    """The model in `directory` (eval mode): built from config.json, weights from model.safetensors, in the dtype
    they were saved in unless `dtype` is given. Quantized copies load too (INT8 ones with Int8Linear modules)."""
    directory = Path(directory)
    if quantization_info(directory) is not None:
        return load_quantized(directory, device=device, dtype=dtype)
    return _load_full(directory, device, dtype)


def _load_full(directory: Path, device: str | torch.device, dtype: torch.dtype | None) -> DecoderOnlyTransformer:
    config = load_config(directory)
    state = _read_weights(directory, device)
    with torch.device(device):
        model = DecoderOnlyTransformer(config)
    problems = _compare(weights_state_dict(model), state)
    if problems:
        raise ModelDirError(f"{directory / WEIGHTS_FILE} does not match its {CONFIG_FILE}: " + "; ".join(problems))
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


# ---------------------------------------------------------------- lineage.json
@dataclasses.dataclass
class Lineage:
    """Where a model came from. Unknown keys (older or newer writers, imports) are kept in `extra` and written
    back at the top level, so every lineage.json ever written still loads and round-trips."""

    tokenizer_sha256: str | None = None
    train_manifest_sha256: str | None = None
    val_manifest_sha256: str | None = None
    step: int | None = None
    val_loss: float | None = None
    tokens_seen: int | None = None
    seq_len: int | None = None  # the training window: learned positions beyond it were never trained
    checkpoint: str | None = None  # the training checkpoint the weights are from, and the best one
    best_checkpoint: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # resolved params.yaml sections
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lineage:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        lineage = cls(**known, extra={k: v for k, v in data.items() if k not in names})
        if lineage.seq_len is None:  # written before seq_len had its own key: it was in params.train
            lineage.seq_len = (lineage.params.get("train") or {}).get("seq_len")
        return lineage

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: fields that are set, then `extra`'s keys."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in data.items() if v not in (None, {})}, **self.extra}


def read_lineage(directory: str | Path) -> Lineage | None:
    """The directory's lineage.json, or None if it has none."""
    path = Path(directory) / LINEAGE_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return Lineage.from_dict(data)


def write_lineage(directory: str | Path, lineage: Lineage) -> Path:
    return write_json_atomic(Path(directory) / LINEAGE_FILE, lineage.to_dict())


# ---------------------------------------------------------------- the whole directory
def write_model_dir(model: DecoderOnlyTransformer, directory: str | Path, tokenizer_file: str | Path,
                    lineage: Lineage, add_files: Callable[[Path], Any] | None = None) -> Path:
    """Write the model directory: weights, config, a copy of the tokenizer model file (so the directory is
    self-contained) and lineage.json. Built beside `directory` and swapped in whole, so a reader never sees a mix
    of two runs; returns it. `add_files(tmp_dir)` writes extra files owned by its caller into the directory before
    the swap (the SFT stage's LoRA adapter, gpt/sft/lora.py)."""
    directory = Path(directory)
    remove_stale_temps(directory.parent, directory.name)  # leftovers of a writer that was killed
    tokenizer = Tokenizer.load(tokenizer_file)
    with atomic_directory(directory) as tmp:
        save_model(model, tmp, metadata={"step": lineage.step, "val_loss": lineage.val_loss})
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer.model_bytes)
        write_lineage(tmp, lineage)
        if add_files is not None:
            add_files(tmp)
    return directory


def check_model_dir(directory: str | Path) -> Path:
    """Fail with a message naming what is missing unless `directory` holds weights and a config."""
    directory = Path(directory)
    if not directory.exists():
        raise ModelDirError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise ModelDirError(f"--checkpoint must be a directory (with {WEIGHTS_FILE} and {CONFIG_FILE}): {directory}")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise ModelDirError(f"missing {directory / name} (is this a model directory?)")
    return directory


@contextlib.contextmanager
def create_new_dir(out: str | Path, error: type[Exception] = ModelDirError) -> Iterator[Path]:
    """`atomic_directory(out)` for an output that must not exist yet (quantize, HF export/import): raises
    `error` naming it if it does."""
    out = Path(out)
    if out.exists():
        raise error(f"output directory already exists: {out} (choose a new --out)")
    with atomic_directory(out) as tmp:
        yield tmp


# ---------------------------------------------------------------- quantized copies (tensor code: gpt.quantize)
def quantization_info(directory: str | Path) -> dict[str, Any] | None:
    """The directory's quantization.json (None for a full-precision model directory)."""
    path = Path(directory) / QUANTIZATION_FILE
    return _read_json(path) if path.is_file() else None


def save_quantized(src: str | Path, out: str | Path, dtype: str) -> Path:
    """Write an `int8` / `bf16` / `fp16` copy of model directory `src` to the new directory `out` (with the
    tokenizer and lineage, and a quantization.json saying what was done); returns `out`."""
    from gpt.quantize import DTYPES, QuantizeError, int8_state_dict

    if dtype not in DTYPES:
        raise QuantizeError(f"dtype: {dtype!r} is not one of {list(DTYPES)}")
    src = check_model_dir(src)
    if quantization_info(src) is not None:
        raise QuantizeError(f"{src} is already quantized ({src / QUANTIZATION_FILE}); quantize the fp32 model instead")
    model = load_model(src)
    config_doc = _read_config_doc(src)
    info = {"format": QUANTIZED_FORMAT, "version": QUANTIZED_VERSION, "dtype": dtype, "source": str(src)}
    lineage = read_lineage(src)
    with create_new_dir(out, QuantizeError) as tmp:
        if dtype == "int8":
            state, quantized = int8_state_dict(model)
            info.update(method="per-channel symmetric INT8 weights (Linear layers + embedding)", quantized=quantized)
            write_atomic(tmp / WEIGHTS_FILE,
                         lambda path: save_file(state, path, metadata={"format": QUANTIZED_FORMAT, "dtype": dtype}))
            write_json_atomic(tmp / CONFIG_FILE, config_doc)
        else:
            info.update(method=f"{dtype} weight copy")
            save_model(model.to(DTYPES[dtype]), tmp, metadata={**config_doc.get("metadata", {}), "dtype": dtype})
        copy_tokenizer(src, tmp)
        if lineage is not None:
            write_lineage(tmp, lineage)
        write_json_atomic(tmp / QUANTIZATION_FILE, info)
    return Path(out)


def load_quantized(directory: str | Path, device: str | torch.device = "cpu", kernel: str | None = None,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a directory written by `save_quantized` (eval mode); INT8 Linear layers use `kernel` (gpt.quantize)."""
    from gpt.quantize import DTYPES, QuantizeError, build_int8_model

    directory = Path(directory)
    path = directory / QUANTIZATION_FILE
    info = quantization_info(directory)
    if not isinstance(info, dict) or info.get("format") != QUANTIZED_FORMAT or info.get("dtype") not in DTYPES:
        raise QuantizeError(f"{path}: not a {QUANTIZED_FORMAT} file with dtype in {list(DTYPES)}")
    if info["dtype"] != "int8":  # a bf16/fp16 copy is a full model directory in that dtype
        return _load_full(directory, device, dtype or DTYPES[info["dtype"]])
    if dtype is not None:
        raise QuantizeError(f"{directory} holds INT8 weights; it cannot be loaded as {dtype}")
    try:
        model = build_int8_model(load_config(directory), _read_weights(directory), info.get("quantized") or [], kernel)
    except QuantizeError as err:
        raise QuantizeError(f"{directory / WEIGHTS_FILE}: {err}") from None
    return model.to(device).eval()


# ---------------------------------------------------------------- loading for inference, `gpt info`
@dataclasses.dataclass
class LoadedModel:
    """Everything generation needs, plus a name to show (`/v1/models`)."""

    model: torch.nn.Module
    tokenizer: Tokenizer | HFTokenizer
    directory: Path
    name: str
    lineage: Lineage | None = None

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.max_seq_len)


def load(directory: str | Path, device: str = "cpu", name: str | None = None) -> LoadedModel:
    """The model (any variant) prepared for generation (gpt.inference), its tokenizer and lineage, checked to fit
    together. For training or saving, use `load_model`: a prepared model's weights may be laid out for decoding."""
    directory = check_model_dir(directory)
    tokenizer = load_tokenizer(directory)
    model = prepare_for_inference(load_model(directory, device=device))
    vocab = int(model.config.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise ModelDirError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} pieces but the model only {vocab} (wrong tokenizer?)"
        )
    return LoadedModel(model, tokenizer, directory, name or directory.resolve().name, read_lineage(directory))


def dir_size_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def describe(directory: str | Path) -> dict[str, Any]:
    """What `gpt info` prints: config, parameter count, tokenizer, lineage, quantization, size on disk."""
    loaded = load(directory)
    model, tok, lineage = loaded.model, loaded.tokenizer, loaded.lineage
    info: dict[str, Any] = {
        "checkpoint": str(loaded.directory),
        "config": model.config.to_dict(),
        "parameters": int(sum(p.numel() for p in model.parameters()) + _packed_params(model)),
        "quantization": quantization_info(loaded.directory),
        "tokenizer": {
            "file": Path(tok.path).name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "sha256": tok.sha256,
        },
        "lineage": lineage.to_dict() if lineage else None,
        "size_on_disk_bytes": dir_size_bytes(loaded.directory),
        "files": {p.name: p.stat().st_size for p in sorted(loaded.directory.iterdir()) if p.is_file()},
    }
    if lineage and lineage.tokenizer_sha256:
        info["tokenizer"]["matches_lineage"] = lineage.tokenizer_sha256 == tok.sha256
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
