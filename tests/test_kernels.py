"""gpt.kernels: the native bf16 GEMV equals a float64 product, is used only where it applies, is built once and
cached, and stays off (ATen takes over) when a compiler or the CPU feature is missing."""

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
