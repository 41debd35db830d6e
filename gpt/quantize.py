"""Smaller and faster copies of a model directory: INT8 weights for CPU inference, and bf16/fp16 weight copies.

INT8 (`quantize_checkpoint(src, out, "int8")`): every `nn.Linear` (attention, MLP, LM head) and the token
embedding get per-output-channel symmetric INT8 weights, `w ≈ int8 * scale[out]`, scale = max|w_row| / 127.
On disk they are plain int8 and float32 tensors in `model.safetensors` (no quantized tensor types, no pickle),
with `quantization.json` saying what was quantized; norms, biases and position tables stay float32. At load time
the embedding is dequantized (a lookup is cheap) and each Linear becomes an `Int8Linear`.

Why this design and which kernel. Batch-1 decoding on a CPU is memory-bound (every token reads every weight),
so storing a quarter of the bytes is what makes it faster. torch 2.13 still ships the fbgemm dynamic-quantized
linear (`torch.ops.quantized.linear_dynamic`: activations quantized to uint8 on the fly, int8 weights) and it
is the fastest INT8 matmul measured here (bench/README.md), but `torch.ao.quantization` and the quantized tensor
types are deprecated (slated for removal; the successor is torchao, which would be one more pinned dependency
whose CPU path wants torch.compile). So the *file format* doesn't depend on them: `Int8Linear` packs the stored
int8 weights for fbgemm when that backend exists, and otherwise falls back to the maintained core op
`torch.ops.aten._weight_int8pack_mm` (weight-only INT8 with bf16 activations), with the same numbers on disk.

bf16 / fp16: the weights cast and saved with `gpt.checkpoint.save_model`; loaded back in that dtype.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gpt.atomic import atomic_directory
from gpt.errors import GptError

QUANT_FILE = "quantization.json"
FORMAT = "gpt-pipeline-quantized"
VERSION = 1
DTYPES = {"int8": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COPIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "lineage.json")
KERNELS = ("fbgemm", "int8pack")


class QuantizeError(GptError, ValueError):
    """Bad quantization request or an unreadable quantized directory (the message names the file or value)."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float → (int8 (out, in), float32 scale (out,)) with weight ≈ int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8Linear(nn.Module):
    """A Linear layer with INT8 weights (per output channel scales); input and output stay float."""

    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q_weight.shape
        self.register_buffer("q_weight", q_weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.num_weight_elements = q_weight.numel()
        self.kernel = kernel or ("fbgemm" if _fbgemm_available() else "int8pack")
        if self.kernel not in KERNELS:
            raise QuantizeError(f"kernel: {self.kernel!r} is not one of {KERNELS}")
        self._packed = self._prepack() if self.kernel == "fbgemm" else None
        self._scale_bf16 = self.scale.to(torch.bfloat16)

    def _prepack(self) -> Any:
        with warnings.catch_warnings():  # the quantized tensor type is deprecated; it only lives inside the pack
            warnings.simplefilter("ignore")
            zero = torch.zeros(self.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.q_weight, self.scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qw, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._packed is not None and x2.device.type == "cpu":
            # reduce_range: 7-bit activations avoid int16 accumulation overflow on CPUs without VNNI (fbgemm)
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._packed, True)
        elif x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.q_weight,
                                                   self._scale_bf16).float()
            if self.bias is not None:
                y = y + self.bias
        else:  # other devices: dequantize on the fly (correct, not fast)
            y = F.linear(x2.float(), dequantize(self.q_weight, self.scale).to(x2.device), self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _int8_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors to store for an INT8 copy: int8 + scale for Linear weights and the embedding, the rest as is."""
    tied = bool(getattr(model.config, "tie_embeddings", False))
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    quantized = [f"{n}.weight" for n in _linear_names(model)] + ["tok_embeddings.weight"]
    if tied:
        quantized.remove("lm_head.weight")  # the same tensor as the embedding: stored once
        state.pop("lm_head.weight", None)
    for key in quantized:
        q, scale = quantize_per_channel(state[key])
        state[key], state[key + "_scale"] = q, scale
    return state, quantized


def _write_dir_atomic(out: Path, fill) -> Path:
    """Create the new directory `out` by filling a temp sibling and renaming it into place (gpt.atomic)."""
    out = Path(out)
    if out.exists():
        raise QuantizeError(f"output directory already exists: {out} (choose a new --out)")
    with atomic_directory(out) as tmp:
        fill(tmp)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def quantize_checkpoint(src: str | Path, out: str | Path, dtype: str) -> Path:
    """Write an `int8` / `bf16` / `fp16` copy of model directory `src` to the new directory `out`."""
    from gpt.checkpoint import load_model, save_model
    from gpt.serve.loading import check_model_dir, quantization_info

    if dtype not in DTYPES:
        raise QuantizeError(f"dtype: {dtype!r} is not one of {list(DTYPES)}")
    src = check_model_dir(src)
    if quantization_info(src) is not None:
        raise QuantizeError(f"{src} is already quantized ({src / QUANT_FILE}); quantize the fp32 model instead")
    model = load_model(src)
    config_doc = json.loads((src / "config.json").read_text(encoding="utf-8"))
    info = {"format": FORMAT, "version": VERSION, "dtype": dtype, "source": str(src)}

    def fill(tmp: Path) -> None:
        if dtype == "int8":
            state, quantized = _int8_state(model)
            info.update(method="per-channel symmetric INT8 weights (Linear layers + embedding)", quantized=quantized)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "dtype": dtype})
            (tmp / "config.json").write_text(json.dumps(config_doc, indent=2, sort_keys=True) + "\n", "utf-8")
        else:
            info.update(method=f"{dtype} weight copy")
            save_model(model.to(DTYPES[dtype]), tmp, metadata={**config_doc.get("metadata", {}), "dtype": dtype})
        _copy_side_files(src, tmp)
        (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return _write_dir_atomic(Path(out), fill)


def _read_info(directory: Path) -> dict[str, Any]:
    path = directory / QUANT_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise QuantizeError(f"{path}: cannot read ({err})") from err
    if info.get("format") != FORMAT or info.get("dtype") not in DTYPES:
        raise QuantizeError(f"{path}: not a {FORMAT} file with dtype in {list(DTYPES)}")
    return info


def load_quantized(directory: str | Path, device: str = "cpu", kernel: str | None = None) -> nn.Module:
    """Load a directory written by `quantize_checkpoint` (eval mode)."""
    from gpt.checkpoint import load_config, load_model
    from gpt.model import DecoderOnlyTransformer

    directory = Path(directory)
    info = _read_info(directory)
    if info["dtype"] != "int8":
        return load_model(directory, device=device, dtype=DTYPES[info["dtype"]]).eval()
    config = load_config(directory)
    state = load_file(str(directory / "model.safetensors"))
    model = DecoderOnlyTransformer(config)
    quantized = set(info["quantized"])
    missing = [k for k in quantized if k not in state or k + "_scale" not in state]
    if missing:
        raise QuantizeError(f"{directory / 'model.safetensors'}: missing quantized tensors {missing[:5]}")
    plain = {k: v for k, v in state.items() if k not in quantized and not k.endswith("_scale")}
    plain["tok_embeddings.weight"] = dequantize(state["tok_embeddings.weight"], state["tok_embeddings.weight_scale"])
    if config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie before replacing
    result = model.load_state_dict(plain, strict=False)
    linear_weights = {f"{n}.weight" for n in _linear_names(model)}
    missing_plain = [k for k in result.missing_keys if k not in linear_weights]
    if missing_plain or result.unexpected_keys:
        raise QuantizeError(f"{directory / 'model.safetensors'} does not match config.json: missing "
                            f"{missing_plain[:5]}, unexpected {result.unexpected_keys[:5]}")
    for name in _linear_names(model):
        key = "tok_embeddings.weight" if name == "lm_head" and config.tie_embeddings else f"{name}.weight"
        linear = model.get_submodule(name)
        bias = state.get(f"{name}.bias")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(state[key], state[key + "_scale"], bias, kernel))
        del linear
    return model.to(device).eval()
