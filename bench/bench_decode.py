"""Decode speed: our KV-cache generation vs Hugging Face `generate` on the same weights vs ours without a cache.

For each model config (seed: the seed project's 93M model; tiny: the pipeline's CPU default) and dtype
(fp32, bf16), batch 1, greedy:
  - tokens/s for `--new-tokens` new tokens after a 16-token prompt: ours (KV cache), HF GPT2LMHeadModel.generate
    (its own KV cache) and ours recomputing the whole sequence each step (`use_cache=False`);
  - per-token decode latency (ms) at several context lengths (prefill excluded): flat = the cache works.
HF runs on exactly our weights (gpt.hf.to_hf_gpt2), and both produce the same tokens (checked here).

    python -m bench.bench_decode                     # the issue's table (~2-3 min on 2 quiet cores)
    python -m bench.bench_decode --write             # also replace this benchmark's section in bench/README.md
    python -m bench.bench_decode --configs tiny --quick

The machine's CPU model, core count, torch threads, load average and MALLOC_* settings are printed with the
table (ours and HF run in the same process, so they share any such setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.common import write_section
from gpt.hf import to_hf_gpt2
from gpt.inference import prepare_for_inference
from gpt.model import DecoderOnlyTransformer, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}





def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def timed(fn, repeats: int, warmup=None) -> float:
    """Median wall time of `repeats` calls, after one warm-up call (of `warmup` if given: a shorter run)."""
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_generate(hf, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def decode_latency_ours(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds per decode step after the prompt (prefill excluded), from the streaming API."""
    stream = model.stream(ids, max_new_tokens=steps + 1, temperature=0)
    next(stream)  # prefill + first token
    start = time.perf_counter()
    for _ in stream:
        pass
    return (time.perf_counter() - start) / steps


def decode_latency_hf(hf, ids: torch.Tensor, steps: int) -> float:
    t_short = timed(lambda: hf_generate(hf, ids, 1), 1)
    t_long = timed(lambda: hf_generate(hf, ids, steps + 1), 1)
    return (t_long - t_short) / steps


def bench_one(preset: str, dtype_name: str, args) -> dict:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, dropout=0.0)
    model = DecoderOnlyTransformer(config).eval().to(DTYPES[dtype_name])
    hf = to_hf_gpt2(model)
    prepare_for_inference(model)  # as gpt.model_dir.load prepares it for `gpt generate` / `serve`
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    new = args.new_tokens
    ours_tokens = model.generate(ids, new, temperature=0)
    same = torch.equal(ours_tokens, hf_generate(hf, ids, new))
    row = {"config": preset, "dtype": dtype_name, "params": model.num_parameters(), "new_tokens": new,
           "same_tokens_as_hf": same}
    row["ours_tok_s"] = new / timed(lambda: model.generate(ids, new, temperature=0), args.repeats,
                                    lambda: model.generate(ids, 8, temperature=0))
    row["hf_tok_s"] = new / timed(lambda: hf_generate(hf, ids, new), args.repeats, lambda: hf_generate(hf, ids, 8))
    nc_new = min(new, args.no_cache_tokens)
    row["ours_no_cache_tok_s"] = nc_new / timed(lambda: model.generate(ids, nc_new, temperature=0, use_cache=False), 1,
                                                lambda: model.generate(ids, 2, temperature=0, use_cache=False))
    row["no_cache_new_tokens"] = nc_new
    row["latency_ms"] = {}
    L, steps = config.max_seq_len, args.latency_steps
    for ctx in (16, L // 4, L // 2, L - steps - 1):  # up to a full context
        ctx_ids = torch.randint(0, config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        ours = statistics.median(decode_latency_ours(model, ctx_ids, args.latency_steps) for _ in range(2))
        theirs = decode_latency_hf(hf, ctx_ids, args.latency_steps)
        row["latency_ms"][ctx] = {"ours": 1e3 * ours, "hf": 1e3 * theirs}
    return row


NOTES = """Notes. Batch 1, greedy, 16-token prompt; both sides run the same weights (gpt.hf.to_hf_gpt2) and produce
the same tokens. HF = transformers' GPT2LMHeadModel.generate with its own KV cache. "No cache" recomputes the
whole sequence every step. Where ours gains: batch-1 decoding is memory-bound, and gpt.inference (applied when a
model is loaded for generation) reads each weight with the fastest GEMV measured here (fp32: weights stored
transposed, (in, out)-contiguous, for MKL; bf16: the native AVX-512 BF16 GEMV of gpt/kernels where it builds, else
torch.addmv instead of oneDNN) and decodes GPT-2-family models through a module-free one-token step; bf16 models
keep their KV cache in fp32 on CPU (bf16 single-query attention is 2-5x slower). The latency table should be flat
in n: each step reads the weights once plus n cached keys. "Same tokens" in bf16: the two sides' bf16 products
round differently (oneDNN in HF; ours or ATen's addmv here), and a random-weight model's logits are nearly tied,
so greedy paths can part (on this Xeon they do with either of our kernels); in fp32 they must not."""


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads; "
        f"load average before/after: {info['load_before']} / {info['load_after']}; "
        f"MALLOC_* env: {info['malloc_env'] or 'not set'}.",
        "",
        "| config | dtype | params | ours (KV cache) tok/s | HF generate tok/s | ours / HF | ours no cache tok/s | same tokens |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    hf_fp32 = {r["config"]: r["hf_tok_s"] for r in rows if r["dtype"] == "fp32"}
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
            f"{r['ours_tok_s'] / r['hf_tok_s']:.2f}x | {r['ours_no_cache_tok_s']:.1f} ({r['no_cache_new_tokens']} tok) | "
            f"{'yes' if r['same_tokens_as_hf'] else 'NO'} |")
    lines += ["", "bf16 vs HF fp32: " + ", ".join(
        f"{r['config']} {r['ours_tok_s'] / hf_fp32[r['config']]:.2f}x" for r in rows
        if r["dtype"] == "bf16" and r["config"] in hf_fp32)]
    lines += ["", "Per-token decode latency (ms, prefill excluded) at context length n (tokens already in the cache), "
              "ours / HF:", "", "| config | dtype | n ≈ 16 | n ≈ L/4 | n ≈ L/2 | n ≈ L (full) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"n={c}: {v['ours']:.2f} / {v['hf']:.2f}" for c, v in r["latency_ms"].items()]
        lines.append(f"| {r['config']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", NOTES])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,seed")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--no-cache-tokens", type=int, default=50, help="new tokens for the (slow) no-cache run")
    parser.add_argument("--latency-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    parser.add_argument("--json", type=Path, default=Path("bench/out/decode.json"))
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.no_cache_tokens, args.latency_steps = 40, 1, 20, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    rows = []
    for preset in args.configs.split(","):
        for dtype_name in args.dtypes.split(","):
            rows.append(bench_one(preset, dtype_name, args))
            print(json.dumps(rows[-1]), flush=True)
    info["load_before"], info["load_after"] = info.pop("load_avg"), [round(x, 2) for x in os.getloadavg()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    text = markdown(rows, info)
    print(text)
    if args.write:
        write_section("decode", "Decoding: ours (KV cache) vs HF GPT2LMHeadModel.generate (bench/bench_decode.py)", text)


if __name__ == "__main__":
    main()
