"""Quantized copies: INT8 logits close to fp32, bf16/fp16 copies, safetensors-only files that load for generation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gpt.model_dir import load, load_model, save_quantized
from gpt.quantize import Int8Linear, QuantizeError, dequantize, quantize_per_channel

IDS = torch.tensor([[5, 99, 200, 17, 300, 42, 8, 77]])


def test_per_channel_round_trip_error_is_within_half_a_step():
    w = torch.randn(64, 48)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert ((dequantize(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", ["fbgemm", "int8pack"])
def test_int8_linear_matches_dequantized_linear(kernel):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    q, scale = quantize_per_channel(w)
    ref = torch.nn.functional.linear(x, dequantize(q, scale), b)
    out = Int8Linear(q, scale, b, kernel=kernel)(x)
    assert out.shape == ref.shape
    # both kernels round activations (uint8 / bf16): compare relative to the output scale
    assert (out - ref).abs().max() / ref.abs().max() < 0.03


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, tmp_path_factory):
    return save_quantized(tiny_model_dir, tmp_path_factory.mktemp("q") / "int8", "int8")


def test_int8_checkpoint_logits_close_to_fp32(int8_dir, tiny_model_dir):
    fp32 = load_model(tiny_model_dir)
    int8 = load(int8_dir).model
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 2 * 4 + 1  # qkv, out, fc, proj ×2 + head
    with torch.no_grad():
        a, b = fp32(IDS)[0], int8(IDS)[0]
    assert (a - b).abs().max() / a.abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_int8_files_are_plain_safetensors(int8_dir, tiny_model_dir):
    info = json.loads((int8_dir / "quantization.json").read_text())
    assert info["dtype"] == "int8" and "tok_embeddings.weight" in info["quantized"]
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {dtypes[k] for k in info["quantized"]} == {torch.int8}
    assert all(d in (torch.int8, torch.float32) for d in dtypes.values())
    assert (int8_dir / "model.safetensors").stat().st_size < 0.5 * (tiny_model_dir / "model.safetensors").stat().st_size
    for name in ("tokenizer.model", "lineage.json", "config.json"):
        assert (int8_dir / name).is_file()


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_copies(tiny_model_dir, tmp_path, dtype, torch_dtype):
    out = save_quantized(tiny_model_dir, tmp_path / dtype, dtype)
    model = load(out).model
    assert model.tok_embeddings.weight.dtype == torch_dtype
    fp32 = load_model(tiny_model_dir)
    with torch.no_grad():
        a, b = fp32(IDS)[0], model(IDS)[0].float()
    assert (a - b).abs().max() / a.abs().max() < 0.05


def test_quantize_errors(tiny_model_dir, int8_dir, tmp_path):
    with pytest.raises(QuantizeError, match="already exists"):
        save_quantized(tiny_model_dir, int8_dir, "int8")
    with pytest.raises(QuantizeError, match="already quantized"):
        save_quantized(int8_dir, tmp_path / "again", "int8")
    with pytest.raises(QuantizeError, match="int4"):
        save_quantized(tiny_model_dir, tmp_path / "x", "int4")
    assert not (tmp_path / "x").exists()


def test_int8_model_serves_completions(int8_dir):
    from fastapi.testclient import TestClient

    from gpt.serve.app import create_app

    loaded = load(int8_dir, name="q")
    ids = loaded.tokenizer.encode("the cat saw")
    greedy = loaded.model.generate(torch.tensor([ids]), 8, temperature=0.0)[0].tolist()
    with TestClient(create_app(loaded)) as client:
        body = client.post("/v1/completions", json={"prompt": "the cat saw", "max_tokens": 8, "temperature": 0})
    assert body.status_code == 200
    assert "the cat saw" + body.json()["choices"][0]["text"] == loaded.tokenizer.decode(greedy)
