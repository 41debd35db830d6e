"""gpt.kernels: the native bf16 GEMV equals a float64 product and the native softmax cross-entropy equals float64
and ATen's ops; each is used only where it applies; they are built once and cached, and stay off (ATen takes over)
when a compiler or the CPU feature is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt import kernels

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"native kernel {kernels.status()}")


def reference(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The float64 product rounded once to bf16: what an fp32-accumulating kernel must come within a rounding of."""
    return (w.double() @ x.double() + (0 if bias is None else bias.double())).bfloat16()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("out", "inp"), [(1, 1), (3, 31), (64, 64), (130, 97), (1000, 768), (17, 3072)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_the_float64_product(out, inp, bias, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(out * 1000 + inp)
    w = torch.randn(out, inp, generator=gen).bfloat16()
    x = torch.randn(inp, generator=gen).bfloat16()
    b = torch.randn(out, generator=gen).bfloat16() if bias else None
    with torch.inference_mode():
        got = kernels.gemv(w, x, b)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (out,)
    want = reference(w, x, b)
    # fp32 sums in another order than float64: within one bf16 rounding step of the exact result
    scale = (w.double().abs() @ x.double().abs()).clamp(min=1e-3)
    assert ((got.double() - want.double()).abs() / scale).max() < 2 ** -7
    if out >= 64:  # and equal to ATen's own bf16 GEMV to the same tolerance
        aten = torch.mv(w, x) if b is None else torch.addmv(b, w, x)
        assert ((got.double() - aten.double()).abs() / scale).max() < 2 ** -7


@needs_kernel
def test_gemv_declines_what_it_does_not_compute():
    w = torch.randn(8, 16).bfloat16()
    x = torch.randn(16).bfloat16()
    assert kernels.gemv(w.float(), x.float()) is None  # float32: ATen/MKL
    assert kernels.gemv(w, x.float()) is None  # mixed dtypes
    assert kernels.gemv(w.t().contiguous().t(), x) is None  # non-contiguous weight
    assert kernels.gemv(w, torch.randn(32).bfloat16()[::2]) is None  # non-contiguous input
    assert kernels.gemv(w, torch.randn(15).bfloat16()) is None  # wrong length
    assert kernels.gemv(w, x, torch.randn(8)) is None  # float32 bias
    assert kernels.gemv(w, x, torch.randn(7).bfloat16()) is None  # a bias the C loop would read past
    w.requires_grad_(True)
    assert kernels.gemv(w, x) is None  # gradients wanted: autograd must see the op
    with torch.no_grad():
        assert kernels.gemv(w, x) is not None


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (3, 15), (7, 16), (9, 37), (64, 8192), (5, 65536 + 3)])
def test_softmax_xent_equals_float64_and_the_aten_ops(rows, vocab, threads, monkeypatch):
    """Gradient softmax − one-hot within one bf16 rounding of float64 and nearly always the very bf16 value ATen's
    fp32 softmax → scatter → cast gives; nll to float32 round-off; ignored (negative) targets: no one-hot, nll 0."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 5).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::3] = -100
    grad = logits.clone()
    nll = kernels.softmax_xent(grad, targets)
    assert nll is not None and nll.dtype == torch.float32 and nll.shape == (rows,)
    want_grad, want_nll = kernels.xent_reference(logits, targets)
    assert ((grad.double() - want_grad).abs() <= want_grad.abs() * 2 ** -8 + 1e-30).all()
    torch.testing.assert_close(nll.double(), want_nll, atol=1e-5, rtol=1e-6)
    assert (nll[targets < 0] == 0).all()
    aten = torch.softmax(logits, dim=-1, dtype=torch.float32)
    aten.scatter_add_(1, targets.clamp(min=0).unsqueeze(1), -(targets >= 0).float().unsqueeze(1))
    assert (grad != aten.bfloat16()).float().mean() < 1e-3  # round-to-nearest ties only


@needs_kernel
def test_softmax_xent_keeps_non_finite_logits_non_finite():
    """A NaN logit makes its row's loss and gradient NaN and +inf its loss non-finite, as ATen's ops do, so the
    training step's finite check still skips such an update; -inf is an ordinary zero-probability entry."""
    logits = torch.randn(4, 40).bfloat16()
    logits[1, 5], logits[2, 7], logits[3, 9] = float("nan"), float("inf"), -float("inf")
    grad = logits.clone()
    nll = kernels.softmax_xent(grad, torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(nll[0]) and torch.isnan(nll[1]) and not torch.isfinite(nll[2]) and torch.isfinite(nll[3])
    assert torch.isnan(grad[1].float()).all() and torch.isfinite(grad[3].float()).all() and grad[3, 9] == 0


@needs_kernel
def test_softmax_xent_declines_what_it_does_not_compute():
    logits, targets = torch.randn(4, 10).bfloat16(), torch.tensor([1, 2, 3, 4])
    assert kernels.softmax_xent(logits.float(), targets) is None  # float32: ATen
    assert kernels.softmax_xent(logits.t().contiguous().t(), targets) is None  # non-contiguous
    assert kernels.softmax_xent(logits, targets.int()) is None  # int32 targets
    assert kernels.softmax_xent(logits, targets[:3]) is None  # a target per row
    before = logits.clone()
    assert kernels.softmax_xent(logits, torch.tensor([1, 2, 3, 10])) is None  # past the vocabulary
    assert torch.equal(logits, before)  # untouched when declined


@needs_kernel
def test_fused_loss_with_and_without_the_native_kernel_agree(monkeypatch):
    """The training loss path (bf16 autocast on a CPU) gives the same loss and gradients through the native kernel
    as through ATen's ops (to bf16 round-off); the ATen path is what runs where the kernel is off."""
    from gpt.model import DecoderOnlyTransformer, ModelConfig

    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("tiny", vocab_size=300, n_layers=2, max_seq_len=32))
    window = torch.randint(0, 300, (4, 33))
    labels = window.clone()
    labels[1, :9] = -100

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(window[:, :-1], labels=labels, return_logits=False)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    computed = []
    real = kernels.softmax_xent
    monkeypatch.setattr(kernels, "softmax_xent", lambda *a: computed.append(real(*a)) or computed[-1])
    native_loss, native_grads = run()
    assert len(computed) == 1 and computed[0] is not None  # one chunk, through the kernel
    monkeypatch.setattr(kernels, "softmax_xent", lambda *a: None)
    aten_loss, aten_grads = run()
    torch.testing.assert_close(native_loss, aten_loss, atol=1e-4, rtol=1e-4)
    for a, b in zip(native_grads, aten_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0) > 0.9999


def run_python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


STATUS = "from gpt import kernels; print(kernels.status())"


def test_off_switch_and_missing_compiler_leave_aten_in_place(tmp_path):
    assert run_python(STATUS, GPT_NATIVE_KERNELS="0") == "off (GPT_NATIVE_KERNELS=0)"
    empty = tmp_path / "bin"
    empty.mkdir()
    status = run_python(f"import sys; sys.path.insert(0, {os.getcwd()!r}); " + STATUS,
                        PATH=str(empty), CC="", GPT_KERNEL_CACHE=str(tmp_path / "cache"))
    assert status.startswith("off:"), status  # no compiler (or, on another CPU, no AVX-512 BF16)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@needs_kernel
def test_built_once_then_loaded_from_the_cache(tmp_path):
    cache = tmp_path / "kernels"
    assert run_python(STATUS, GPT_KERNEL_CACHE=str(cache)).startswith("on:")
    built = list(cache.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temp file left behind
    mtime = built[0].stat().st_mtime_ns
    assert run_python(STATUS, GPT_KERNEL_CACHE=str(cache)).startswith("on:")
    assert [p.stat().st_mtime_ns for p in cache.iterdir()] == [mtime]  # reused, not rebuilt
