"""gpt.inference: the decode fast path computes what F.linear computes, also after any in-place weight edit, and a
prepared model generates what the plain model generates."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt.inference import DecodeLinear, OneTokenStep, prepare_for_inference
from gpt.model.generation import greedy
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


def test_prepare_drops_only_zero_probability_dropout():
    """p == 0 dropout is an identity and goes; p > 0 stays, so a prepared model still trains with dropout."""
    plain = build(small(dropout=0.0))
    logits = plain(torch.arange(9).unsqueeze(0))[0]
    prepare_for_inference(plain)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    torch.testing.assert_close(plain(torch.arange(9).unsqueeze(0))[0], logits, atol=1e-5, rtol=1e-5)

    noisy = build(small(dropout=0.5)).train()
    prepare_for_inference(noisy)
    assert noisy.training  # the warm-up decode restores the mode it found
    assert sum(isinstance(m, nn.Dropout) for m in noisy.modules()) > 0
    ids = torch.arange(9).unsqueeze(0)
    assert not torch.equal(noisy(ids)[0], noisy(ids)[0])  # dropout still active in training mode
    noisy.eval()
    assert torch.equal(noisy(ids)[0], noisy(ids)[0])


def test_openmp_wait_policy_follows_idle_cores(monkeypatch):
    """Spin (libgomp's default) only when every thread has an idle core; otherwise, or unknown, PASSIVE."""
    from gpt import cli

    for idle, threads, expected in ((2.0, 2, None), (1.6, 2, None), (1.0, 2, "PASSIVE"), (1.0, 1, None),
                                    (0.1, 1, "PASSIVE"), (None, 2, "PASSIVE")):
        monkeypatch.setattr(cli, "_idle_cpus", lambda idle=idle: idle)
        assert cli.openmp_wait_policy(threads) == expected, (idle, threads)
    monkeypatch.undo()
    idle = cli._idle_cpus(0.01)
    assert idle is None or 0.0 <= idle <= os.cpu_count() + 0.5


@pytest.mark.parametrize(("preset_env", "idle", "expected"), [(None, 8.0, None), (None, 0.0, "PASSIVE"),
                                                               ("ACTIVE", 0.0, "ACTIVE")])
def test_cli_sets_the_wait_policy_before_decoding(monkeypatch, tmp_path, preset_env, idle, expected):
    from gpt import cli

    if preset_env is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset_env)
    monkeypatch.setattr(cli, "_idle_cpus", lambda seconds=0.05: idle)
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "missing"), "hi"]) == 1  # fails after choosing
    assert os.environ.get("OMP_WAIT_POLICY") == expected


def test_int8_single_call_path_equals_the_general_path():
    """Int8Linear's one-fbgemm-call path (contiguous float32) gives what the reshape path gives (non-contiguous
    input of the same values), for a decode row and a batch."""
    from gpt.quantize import Int8Linear, quantize_per_channel

    torch.manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(48, 64))
    layer = Int8Linear(q, scale, torch.randn(48))
    if layer.kernel != "fbgemm":
        pytest.skip("fbgemm is not in this torch build")
    for shape in ((1, 1, 64), (3, 5, 64)):
        x = torch.randn(shape)
        strided = torch.randn(*shape[:-1], 64, 2)[..., 0]  # the same kind of values, not contiguous
        strided.copy_(x)
        assert not strided.is_contiguous()
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), layer(strided), atol=0, rtol=0)


STEP_MODELS = {"gpt2": dict(preset="tiny"), "qwen3-gqa": dict(preset="qwen3-style", n_kv_heads=2),
               "llama-mha": dict(preset="qwen3-style", qk_norm=False), "gpt2-gqa": dict(preset="tiny", n_kv_heads=2)}


@pytest.mark.parametrize("arch", list(STEP_MODELS))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_one_token_step_equals_the_model_forward(arch, kind):
    """The prepared model's module-free decode step gives bit-identical hidden states and cache contents to
    `model.hidden_states` with the same cache, token after token: GPT-2 blocks (its one-view fast path, and with
    grouped-query heads), Qwen3-style (RoPE, QK-norm, GQA, SwiGLU) and Llama-style blocks; fp32, bf16 with its fp32
    cache, INT8-quantized linears."""
    from gpt.quantize import build_int8_model, int8_state_dict

    spec = dict(STEP_MODELS[arch])
    model = build(small(spec.pop("preset"), max_seq_len=32, **spec)).eval()
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    if kind == "int8":
        model = build_int8_model(model.config, *int8_state_dict(model))
    prepare_for_inference(model)
    step = model.one_token_step
    assert step.simple == (arch == "gpt2")
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    caches = [model.new_cache(1), model.new_cache(1)]
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(prompt, cache=cache)
        token = prompt[:, -1:]
        for _ in range(27):  # up to the cache's capacity
            fast = step(token, caches[0])
            plain = model.hidden_states(token, cache=caches[1])
            assert torch.equal(fast, plain)
            assert caches[0].length == caches[1].length
            token = greedy(model.lm_head(fast[:, -1])).view(1, 1)
        assert caches[0].length == caches[0].capacity == 32
        assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)
        with pytest.raises(RuntimeError, match="KV cache full"):
            step(token, caches[0])


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style"])
def test_one_token_step_only_for_dense_models(preset):
    """MoE models keep the general path; generation with a step equals generation without it (the sliding window
    re-encodes through the general path)."""
    for moe in ("moe", "hybrid"):
        assert not OneTokenStep.applies(build(small(moe)))
    model = prepare_for_inference(build(small(preset, max_seq_len=16)))
    assert OneTokenStep.applies(model) and isinstance(model.one_token_step, OneTokenStep)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    with_step = model.generate(prompt, max_new_tokens=40, temperature=0)  # slides past max_seq_len twice
    del model.one_token_step
    assert torch.equal(model.generate(prompt, max_new_tokens=40, temperature=0), with_step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_including_ties(dtype):
    logits = torch.randn(4, 1000).to(dtype)
    logits[0, 10] = logits[0, 700] = logits[0].max() + 1  # a tie: the first index wins, as with argmax
    logits[1] = 0
    logits[2, 3] = float("nan")
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert greedy(logits).tolist()[:3] == [10, 0, 3]
