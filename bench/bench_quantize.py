"""Quantization benchmark: size on disk, batch-1 decode tokens/s and validation perplexity for fp32 / bf16 / INT8.

    python -m bench.bench_quantize                      # seed config (random init) + paths.model if trained
    python -m bench.bench_quantize --models seed --new-tokens 64 --repeats 2

Each model is written with `gpt quantize` (gpt/quantize.py) into a temp dir and loaded back the way `gpt
generate`/`gpt serve` load it. Decode: greedy, KV cache, batch 1, a 16-token prompt, the median of --repeats
timed runs after one warm-up. Perplexity: mean next-token loss over the first --val-windows windows of
`paths.shards/val` (only for a trained model whose tokenizer matches the shards; the random-init seed model's
"perplexity" only shows that quantization keeps the numbers, so it is marked as such). The ratios compare against
fp32 measured in the same process, so machine load affects both sides alike (the table still records `uptime`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import write_section
from gpt.inference import prepare_for_inference
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import WEIGHTS_FILE, load_model, save_model, save_quantized
from gpt.params import load_params

VARIANTS = ("fp32", "bf16", "int8")


def decode_tokens_per_s(model: torch.nn.Module, new_tokens: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, model.config.vocab_size, (1, 16), generator=gen)
    model.generate(prompt, 8, temperature=0.0)  # warm-up (allocations, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(prompt, new_tokens, temperature=0.0)
        times.append(time.perf_counter() - start)
        assert out.shape[1] == 16 + new_tokens
    return new_tokens / statistics.median(times)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, val_dir: Path, seq_len: int, max_windows: int) -> float:
    from gpt.data.shards import TokenShards

    shards = TokenShards(val_dir, vocab_size=None)
    total, count = 0.0, 0
    for window in shards.iter_windows(seq_len, max_windows=max_windows):
        ids = window.long().unsqueeze(0)
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum")
        total, count = total + float(loss), count + ids.shape[1] - 1
    return math.exp(total / count)


def layer_table(repeats: int = 30) -> str:
    """Milliseconds per batch-1 matmul of the seed config's layer shapes, per kernel (the INT8 kernel choice)."""
    from gpt.quantize import Int8Linear, quantize_per_channel

    def ms(fn) -> float:
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    lines = ["| layer (in → out) | fp32 F.linear | INT8 fbgemm | INT8 _weight_int8pack_mm | bf16 F.linear |",
             "|---|---:|---:|---:|---:|"]
    for name, k, n in [("attn qkv", 768, 2304), ("mlp fc", 768, 3072), ("mlp proj", 3072, 768),
                       ("lm head", 768, 65536)]:
        w = torch.randn(n, k) * 0.02
        q, scale = quantize_per_channel(w)
        fbgemm, int8pack = Int8Linear(q, scale, None, "fbgemm"), Int8Linear(q, scale, None, "int8pack")
        xk = torch.randn(1, k)
        with torch.inference_mode():
            calls = [partial(F.linear, xk, w), partial(fbgemm, xk), partial(int8pack, xk),
                     partial(F.linear, xk.bfloat16(), w.bfloat16())]
            cells = [ms(call) for call in calls]
        lines.append(f"| {name} ({k} → {n}) | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def _variant_dirs(src: Path, work: Path) -> dict[str, Path]:
    dirs = {"fp32": src}
    for dtype in ("bf16", "int8"):
        dirs[dtype] = save_quantized(src, work / dtype, dtype)
    return dirs


def bench_model(label: str, src: Path, work: Path, args: argparse.Namespace, val_dir: Path | None) -> list[dict]:
    rows = []
    for variant, directory in _variant_dirs(src, work).items():
        model = prepare_for_inference(load_model(directory))  # as `gpt generate` loads it (gpt.model_dir.load)
        row = {"model": label, "variant": variant, "size_mb": (directory / WEIGHTS_FILE).stat().st_size / 1e6,
               "tok_s": decode_tokens_per_s(model, args.new_tokens, args.repeats)}
        if val_dir is not None:
            row["ppl"] = perplexity(model, val_dir, min(model.config.max_seq_len, args.seq_len), args.val_windows)
        rows.append(row)
        print(f"  {label:28s} {variant:5s} {row['size_mb']:8.1f} MB {row['tok_s']:7.1f} tok/s"
              + (f"  ppl {row['ppl']:.3f}" if "ppl" in row else ""), flush=True)
        del model
    return rows


def _seed_model_dir(work: Path) -> Path:
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("seed", dropout=0.0)).eval()
    return save_model(model, work / "seed-fp32")


def markdown(rows: list[dict]) -> str:
    lines = ["| model | weights | model.safetensors (MB) | decode tok/s | × fp32 | val perplexity | Δ ppl vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        b = base[r["model"]]
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "n/a"
        delta = f"{100 * (r['ppl'] / b['ppl'] - 1):+.2f}%" if "ppl" in r else "n/a"
        lines.append(f"| {r['model']} | {r['variant']} | {r['size_mb']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / b['tok_s']:.2f} | {ppl} | {delta} |")
    return "\n".join(lines)


def machine() -> str:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    malloc = "set" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "not set"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, MALLOC_* thresholds {malloc}; uptime: {uptime}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seed", "trained"], choices=["seed", "trained"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-windows", type=int, default=64)
    parser.add_argument("--trained", type=Path, default=None, help="trained model dir (default: paths.model)")
    parser.add_argument("--layers", action="store_true", help="only the per-layer kernel table (ms per matmul)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = load_params().paths
    print(machine(), flush=True)
    if args.layers:
        print(layer_table())
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_quantize.") as tmp:
        work = Path(tmp)
        if "seed" in args.models:
            rows += bench_model("seed config (random init)", _seed_model_dir(work), work / "seed", args, None)
        trained = args.trained or paths.model
        if "trained" in args.models:
            if (trained / WEIGHTS_FILE).is_file():
                val = paths.shards / "val"
                rows += bench_model(f"trained ({trained})", trained, work / "trained", args,
                                    val if (val / "manifest.json").is_file() else None)
            else:
                print(f"skipping the trained model: {trained / WEIGHTS_FILE} not found (run `make repro`)")
    text = f"{markdown(rows)}\n\n{machine()}"
    print()
    print(text)
    if args.write:
        write_section("quantize", "Quantization: size, decode speed, perplexity (`bench/bench_quantize.py`, issue 6)", text)


if __name__ == "__main__":
    main()
