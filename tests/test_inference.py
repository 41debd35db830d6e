"""gpt.inference: the decode fast path computes what F.linear computes, also after any in-place weight edit, and a
prepared model generates what the plain model generates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt.inference import DecodeLinear, prepare_for_inference
from tests.test_model import build, small

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def prepared_layer(dtype: torch.dtype, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=bias)).to(dtype)
    prepare_for_inference(model)
    layer = model[0]
    assert isinstance(layer, DecodeLinear)
    # the layouts the fast kernels want: fp32 stored (in, out)-contiguous, bf16 as is for torch.addmv
    assert layer.weight.t().is_contiguous() if dtype == torch.float32 else layer.weight.is_contiguous()
    return layer


def assert_matches_f_linear(layer: nn.Module, dtype: torch.dtype) -> None:
    """One-row (decode), several-row and autograd calls all equal F.linear on the layer's current weights."""
    tol = TOLERANCE[dtype]
    for shape in ((1, 1, 64), (1, 64), (3, 5, 64)):
        x = torch.randn(shape, dtype=dtype)
        expected = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
        with torch.inference_mode():
            torch.testing.assert_close(layer(x).double(), expected, atol=tol, rtol=tol)
    assert layer(torch.randn(1, 64, dtype=dtype)).requires_grad  # still differentiable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_path_equals_f_linear_after_in_place_weight_edits(dtype, bias):
    layer = prepared_layer(dtype, bias)
    assert_matches_f_linear(layer, dtype)

    with torch.inference_mode():  # a decode call first, so any cached state would now be stale
        layer(torch.randn(1, 1, 64, dtype=dtype))
    layer.weight.data.mul_(2)  # .data: bypasses the parameter's version counter
    assert_matches_f_linear(layer, dtype)

    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer-style in-place update
    assert_matches_f_linear(layer, dtype)

    fresh = nn.Linear(64, 48, bias=bias).to(dtype)
    layer.load_state_dict(fresh.state_dict())  # copies into the existing storage
    assert torch.equal(layer.weight, fresh.weight)
    assert_matches_f_linear(layer, dtype)

    layer.weight.data = torch.randn(48, 64, dtype=dtype)  # a new tensor, in the ordinary (out, in) layout
    if bias:
        layer.bias.data = torch.randn(48, dtype=dtype)
    assert_matches_f_linear(layer, dtype)


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style", "moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_generates_the_same_tokens(preset, dtype):
    model = build(small(preset, max_seq_len=64)).to(dtype)
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    before = model.generate(prompt, max_new_tokens=24, temperature=0)
    with torch.no_grad():
        logits_before = model(prompt)[0]
    prepare_for_inference(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.tok_embeddings.weight  # the tie survives the swap
    assert torch.equal(model.generate(prompt, max_new_tokens=24, temperature=0), before)
    with torch.no_grad():
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(model(prompt)[0], logits_before, atol=tol, rtol=tol)


def test_prepared_model_follows_a_reloaded_state_dict():
    trained, other = build(small(), seed=0), build(small(), seed=1)
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = trained.generate(prompt, max_new_tokens=16, temperature=0)
    prepare_for_inference(other)
    other.generate(prompt, max_new_tokens=4, temperature=0)  # decode once with the old weights
    other.load_state_dict(trained.state_dict())
    assert torch.equal(other.generate(prompt, max_new_tokens=16, temperature=0), expected)
