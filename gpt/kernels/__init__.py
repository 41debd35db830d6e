"""Native CPU kernels, compiled on first use from the C sources next to this file: a batch-1 bf16 GEMV for
decoding and a bf16 softmax cross-entropy (with its gradient) for training.

Why the GEMV (`gemv.c`): decoding a token is a chain of matrix-vector products that read every weight once, so
tokens/s is the rate at which the GEMVs stream weights from memory. On the 2-core Xeon of bench/README.md, ATen's
bf16 GEMV pays ~20 us per call before it reads anything and streams layer-sized matrices at ~24 GB/s; `gemv.c` (a
prefetching AVX-512 BF16 loop) costs ~2 us per call and streams them at ~37 GB/s while they are cache-resident, for
1.13x seed-model decode tokens/s. For float32, MKL's GEMV on a transposed weight stayed faster than the same loop
(0.91x), so float32 keeps it (`gpt.inference`). `gpt.inference.DecodeLinear` calls `gemv` for single-row bf16
products and falls back to ATen whenever it returns None.

Why the cross-entropy (`xent.c`): the training step's fused LM head + loss (`gpt.model.loss`) turns each chunk of
bf16 logits into per-row losses and the gradient softmax − one-hot. ATen does it in four passes through a float32
copy of the chunk (softmax, gather, scatter, cast back); `softmax_xent` does it in one pass per row, in place. It
applies to bf16 logits on the CPU; everything else (float32, GPUs) keeps the ATen ops.

How they are built: with the C compiler on PATH (`$CC`, else `cc`/`gcc`/`clang`), `-O3 -march=native -fopenmp`, into
one shared library linked against the OpenMP runtime bundled with torch (the same thread pool torch uses, so the
two never oversubscribe the cores). The library is cached under `$GPT_KERNEL_CACHE` (default
`$XDG_CACHE_HOME/gpt/kernels`, i.e. `~/.cache/gpt/kernels`), keyed by the sources, the compiler, the flags and the
CPU's feature flags, and written atomically; a compile takes about a second. After loading, a self-check compares
each kernel with a float64 computation on odd shapes; anything missing (AVX-512 BF16, a compiler, torch's OpenMP
runtime) or failing (the compile, the self-check) leaves ATen's kernels in place, with the reason in `status()`.
`GPT_NATIVE_KERNELS=0` turns the kernels off (for comparisons and troubleshooting).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from gpt.atomic import write_atomic

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemv.c", "xent.c"))
HEADERS = (Path(__file__).with_name("bf16.h"),)  # included by the sources: part of the cache key
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
COMPILE_TIMEOUT_S = 120

def status() -> str:
    """One line: whether the native kernel is in use, or why not."""
    return _load()[1]


def cache_dir() -> Path:
    if os.environ.get("GPT_KERNEL_CACHE"):
        return Path(os.environ["GPT_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _torch_openmp() -> Path | None:
    """The GNU OpenMP runtime torch ships with (torch/lib/libgomp*.so*), or None (another runtime, or none)."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, gomp: Path) -> Path:
    """Compile the sources into one shared library (cached) → its path. Raises on a failed compile."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, cc, version, *FLAGS, str(gomp), _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target

    def compile_to(tmp: str) -> None:
        cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, f"-L{gomp.parent}", f"-l:{gomp.name}",
               f"-Wl,-rpath,{gomp.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            error = done.stderr.strip()[-400:]
            raise RuntimeError(f"compiling {', '.join(src.name for src in SOURCES)} with {cc} failed (exit "
                               f"{done.returncode}{': ' + error if error else ''}); ATen's kernels are used (set CC "
                               "to another C compiler, or GPT_NATIVE_KERNELS=0 to skip the build)")

    return write_atomic(target, compile_to)


def _bind(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.gemv_bf16.restype = None
    lib.softmax_xent_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.softmax_xent_bf16.restype = None


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Compare the kernels with float64 (odd sizes: tails; with and without bias; an ignored target) → a problem
    or None."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 37, generator=gen) * 4).bfloat16()
    targets = torch.tensor([0, 36, 5, -100, 17])
    grad, nll = logits.clone(), torch.empty(5)
    _xent(lib, grad, targets, nll, torch.get_num_threads())
    want_grad, want_nll = xent_reference(logits, targets)
    if not (torch.allclose(grad.double(), want_grad, atol=1e-2) and torch.allclose(nll.double(), want_nll, atol=1e-4)):
        return "self-check of the softmax cross-entropy failed"
    for out, inp in ((37, 70), (5, 64), (129, 300)):
        w = torch.randn(out, inp, generator=gen).bfloat16()
        x = torch.randn(inp, generator=gen).bfloat16()
        for bias in (None, torch.randn(out, generator=gen).bfloat16()):
            want = w.double() @ x.double() + (0 if bias is None else bias.double())
            got = _call(lib, w, x, bias, torch.get_num_threads()).double()
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * inp ** 0.5):
                return f"self-check failed at {out}x{inp} (max error {(got - want).abs().max():.3g})"
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (why: `status()`). Built and checked once per process."""
    return _load()[0]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """→ (the library or None, the status line)."""
    if os.environ.get("GPT_NATIVE_KERNELS", "1") == "0":
        return None, "off (GPT_NATIVE_KERNELS=0)"
    if "avx512_bf16" not in _cpu_flags().split():
        return None, "off: this CPU has no AVX-512 BF16 (ATen's kernels are used)"
    cc, gomp = _compiler(), _torch_openmp()
    if cc is None:
        return None, "off: no C compiler on PATH (install gcc, or set CC, for faster bf16 CPU training and decoding)"
    if gomp is None:
        return None, "off: this torch build ships no GNU OpenMP runtime to share (ATen's kernels are used)"
    try:
        lib = ctypes.CDLL(str(_build(cc, gomp)))
        _bind(lib)
        problem = _self_check(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"off: {exc}"
    if problem:
        return None, f"off: {problem}; ATen's kernels are used (please report this with your CPU and compiler)"
    return lib, "on: bf16 GEMV + softmax cross-entropy (AVX-512 BF16)"


def _call(lib: ctypes.CDLL, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
          threads: int) -> torch.Tensor:
    y = torch.empty(w.shape[0], dtype=w.dtype)
    lib.gemv_bf16(w.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                  w.shape[0], w.shape[1], threads)
    return y


def gemv(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """weight (out, in) @ x (in,) + bias (out,), all bf16 on the CPU, with the native kernel → (out,); None when it
    does not apply (another dtype, device or shape, non-contiguous operands, gradients wanted, kernel off). The
    checks guard the C loop, which reads exactly out × in, in and out elements."""
    if (weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or weight.dim() != 2 or x.shape != (weight.shape[1],) or not weight.is_contiguous()
            or not x.is_contiguous()
            or (bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (weight.shape[0],)
                                      or not bias.is_contiguous()))
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return None
    lib = library()
    return None if lib is None else _call(lib, weight, x, bias, torch.get_num_threads())


def xent_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `softmax_xent` computes, in float64: (softmax − one-hot of the scored targets, nll with 0 where the
    target is < 0)."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    scored = targets >= 0
    safe = targets.clamp(min=0).unsqueeze(1)
    grad = log_p.exp().scatter_add(1, safe, -scored.double().unsqueeze(1))
    return grad, -log_p.gather(1, safe).squeeze(1) * scored


def _xent(lib: ctypes.CDLL, logits: torch.Tensor, targets: torch.Tensor, nll: torch.Tensor, threads: int) -> None:
    scratch = torch.empty(threads, logits.shape[1], dtype=torch.float32)
    lib.softmax_xent_bf16(logits.data_ptr(), targets.data_ptr(), nll.data_ptr(), scratch.data_ptr(),
                          logits.shape[0], logits.shape[1], threads)


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """For bf16 logits (rows, vocabulary) on the CPU and int64 targets (rows,): overwrite `logits` with the
    gradient of the summed cross-entropy, softmax − one-hot(target) (rounded once to bf16; rows whose target is < 0
    get no one-hot), and return each row's negative log-likelihood (float32; 0 where the target is < 0). None, with
    `logits` untouched, when it does not apply (another dtype or device, non-contiguous tensors, a target ≥ the
    vocabulary, kernel off). Not differentiable: for use inside an autograd.Function."""
    if (logits.dtype != torch.bfloat16 or logits.device.type != "cpu" or logits.dim() != 2
            or not logits.is_contiguous() or targets.dtype != torch.int64 or targets.shape != logits.shape[:1]
            or not targets.is_contiguous() or targets.device.type != "cpu"):
        return None
    lib = library()
    if lib is None or (targets.numel() and int(targets.max()) >= logits.shape[1]):
        return None
    nll = torch.empty(logits.shape[0], dtype=torch.float32)
    _xent(lib, logits, targets, nll, torch.get_num_threads())
    return nll
