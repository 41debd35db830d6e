"""GPU numbers for the seed config in one short run: training tokens/s and MFU (ours vs HF GPT-2, eager and
torch.compile), batch-1 decode tokens/s (ours vs HF `generate`), and FSDP2 (NCCL, through torchrun) at the seed
config and a ~1B-parameter config with memory per GPU.

Made for a lent GPU machine with a short lease: every section is timed and guarded (one failing section does not
stop the rest), the measured ceilings (a large bf16 matmul, a device-to-device copy) are taken in the same run, and
the table is printed last. It needs only torch (+ transformers for the peer) — not the project's pipeline extras.

    python -m bench.bench_gpu                 # everything, JSON to $OUT/gpu.json (or bench/out/gpu.json)
    python -m bench.bench_gpu --sections train,decode --steps 5

FLOPs per token are the PaLM count (gpt/train/metrics.py flops_per_token); MFU is against the datasheet's dense
bf16 peak (989 TFLOP/s for H100/H200) and, in a second column, against the matmul ceiling measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.bench_train import hf_model as hf_gpt2  # the same HF GPT-2 peer as the CPU training bench
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.train.metrics import PEAK_FLOPS, flops_per_token

BIG = dict(d_model=2048, n_layers=18, n_heads=16)  # ~1.04B parameters with the seed's 65536 vocabulary


def sync() -> None:
    torch.cuda.synchronize()


def ceilings() -> dict:
    """Measured bf16 matmul FLOP/s (8192^3, random data) and copy bandwidth (bytes read + written per second)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    sync()
    matmul = 2 * n**3 * reps / (time.perf_counter() - start)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    copy = 2 * x.numel() * 20 / (time.perf_counter() - start)
    return {"matmul_bf16_flops": matmul, "copy_bytes_per_s": copy, "device": torch.cuda.get_device_name(0)}


def guarded(fn, *args) -> dict:
    """One measurement; its error is recorded instead of ending the section."""
    try:
        return fn(*args)
    except Exception:
        return {"args": repr(args[:3]), "error": traceback.format_exc()[-1500:]}
    finally:
        torch.cuda.empty_cache()


def train_throughput(kind: str, compiled: bool | str, batch: int, steps: int, cfg: ModelConfig) -> dict:
    torch.manual_seed(0)
    model = (DecoderOnlyTransformer(cfg) if kind == "ours" else hf_gpt2(cfg)).cuda().train()
    fpt = flops_per_token(DecoderOnlyTransformer(cfg) if kind == "hf" else model, cfg.n_layers, cfg.d_model,
                          cfg.max_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    mode = compiled if isinstance(compiled, str) else None  # a torch.compile mode, e.g. max-autotune-no-cudagraphs
    run = torch.compile(model, mode=mode) if compiled else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if kind == "ours":
                _, loss = run(x[:, :-1], labels=x)
            else:
                loss = run(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * cfg.max_seq_len
    return {"model": kind, "compile": compiled, "batch": batch, "seq_len": cfg.max_seq_len,
            "tok_s": tokens / seconds, "step_ms": 1e3 * seconds, "flops_per_token": fpt,
            "tflops": fpt * tokens / seconds / 1e12, "warmup_s": warmup,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def decode_throughput(kind: str, cfg: ModelConfig, new_tokens: int = 128, reps: int = 3) -> dict:
    torch.manual_seed(0)
    model = (DecoderOnlyTransformer(cfg) if kind == "ours" else hf_gpt2(cfg)).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(1, cfg.vocab_size, (1, 16), device="cuda")

    def once() -> int:
        with torch.inference_mode():
            if kind == "ours":
                out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0)
            else:
                out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     use_cache=True, pad_token_id=0)
        return out.shape[1] - prompt.shape[1]

    once()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        n = once()
        sync()
        times.append((time.perf_counter() - start) / n)
    best = sorted(times)[len(times) // 2]
    return {"model": kind, "dtype": "bf16", "new_tokens": new_tokens, "tok_s": 1.0 / best}


def fsdp_worker(args: argparse.Namespace) -> None:
    """Run under torchrun: FSDP2 (the project's shard_model) on NCCL, bf16 params / fp32 reduce."""
    import torch.distributed as dist

    from gpt.train.device import Precision
    from gpt.train.fsdp import shard_model

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cfg = ModelConfig.from_preset("seed", dropout=0.0, **(BIG if args.size == "1b" else {}))
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model, cfg.n_layers, cfg.d_model, cfg.max_seq_len)
    if args.mode == "fsdp":
        shard_model(model, torch.device("cuda"), Precision("bf16", "cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x[:, :-1], labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * cfg.max_seq_len * dist.get_world_size()
    if rank == 0:
        print("FSDP_RESULT " + json.dumps({
            "mode": args.mode, "size": args.size, "params": n_params, "world_size": dist.get_world_size(),
            "batch_per_rank": args.batch, "tok_s": tokens / seconds,
            "tflops_per_gpu": fpt * tokens / seconds / 1e12 / dist.get_world_size(),
            "peak_mem_gib_per_gpu": torch.cuda.max_memory_allocated() / 2**30}), flush=True)
    dist.destroy_process_group()


def fsdp_runs(steps: int) -> list[dict]:
    results = []
    for size, mode, batch in (("seed", "fsdp", 32), ("1b", "fsdp", 8), ("1b", "plain", 8)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "bench.bench_gpu", "--fsdp-worker", "--size", size, "--mode", mode,
               "--batch", str(batch), "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FSDP_RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"size": size, "mode": mode, "error": (proc.stderr or proc.stdout)[-1500:]})
        else:
            results.append(json.loads(lines[-1].split(" ", 1)[1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="ceilings,train,decode,fsdp")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fsdp-worker", action="store_true")
    parser.add_argument("--size", default="seed")
    parser.add_argument("--mode", default="fsdp")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ours", default="", help="only our compiled model at these batch[:compile-mode] settings, "
                        "e.g. 128,64:max-autotune-no-cudagraphs")
    args = parser.parse_args()
    if args.fsdp_worker:
        fsdp_worker(args)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig.from_preset("seed", dropout=0.0)
    out_dir = Path(os.environ.get("OUT", "bench/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "sections": {}}
    sections = args.sections.split(",")

    def section(name: str, fn) -> None:
        if name not in sections:
            return
        start = time.perf_counter()
        try:
            report["sections"][name] = fn()
        except Exception:
            report["sections"][name] = {"error": traceback.format_exc()[-2000:]}
        print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
        (out_dir / "gpu.json").write_text(json.dumps(report, indent=1))

    section("ceilings", ceilings)
    runs = [("ours", False, 64), ("hf", False, 64), ("ours", True, 64), ("hf", True, 64)]
    if args.ours:
        runs = [("ours", (item.split(":") + [True])[1], int(item.split(":")[0])) for item in args.ours.split(",")]
    section("train", lambda: [guarded(train_throughput, kind, compiled, batch, args.steps, cfg)
                              for kind, compiled, batch in runs])
    section("decode", lambda: [guarded(decode_throughput, kind, cfg) for kind in ("ours", "hf", "ours", "hf")])
    section("fsdp", lambda: fsdp_runs(args.steps))

    name = torch.cuda.get_device_name(0)
    peak = next((p["bf16"] for k, p in PEAK_FLOPS.items() if k in name), None)
    measured = report["sections"].get("ceilings", {}).get("matmul_bf16_flops")
    print(f"\n{name}, torch {torch.__version__}; datasheet bf16 peak {(peak or 0) / 1e12:.0f} TFLOP/s, "
          f"measured matmul {(measured or 0) / 1e12:.0f} TFLOP/s")
    for row in report["sections"].get("train", []) if isinstance(report["sections"].get("train"), list) else []:
        if "error" in row:
            print("train ERROR", row)
            continue
        mfu = row["tflops"] * 1e12 / peak if peak else float("nan")
        mfu_m = row["tflops"] * 1e12 / measured if measured else float("nan")
        print(f"train {row['model']:4s} compile={row['compile']!s:5s} B={row['batch']} T={row['seq_len']}: "
              f"{row['tok_s']:,.0f} tok/s, {row['tflops']:.0f} TFLOP/s, MFU {mfu:.1%} (of measured {mfu_m:.1%}), "
              f"warm-up {row['warmup_s']:.0f} s, peak mem {row['peak_mem_gib']:.1f} GiB")
    for row in report["sections"].get("decode", []) if isinstance(report["sections"].get("decode"), list) else []:
        if "error" in row:
            print("decode ERROR", row)
            continue
        print(f"decode {row['model']:4s} bf16 batch 1, {row['new_tokens']} new tokens: {row['tok_s']:.0f} tok/s")
    for row in report["sections"].get("fsdp", []) if isinstance(report["sections"].get("fsdp"), list) else []:
        print("fsdp", json.dumps(row)[:600])
    for key, value in report["sections"].items():
        if isinstance(value, dict) and "error" in value:
            print(f"ERROR in {key}:\n{value['error']}")
    print(json.dumps(report["sections"].get("ceilings", {})))


if __name__ == "__main__":
    main()
