"""Training throughput: our DecoderOnlyTransformer vs Hugging Face GPT2LMHeadModel (SDPA attention).

Identical shapes (vocab, width, depth, heads, context, tied embeddings, no dropout), identical step:
forward + backward + AdamW, fp32 and bf16 autocast, for the `tiny` and `seed` presets. Reports tokens/s, the
ratio ours/HF, and achieved GFLOP/s (PaLM FLOPs/token, see gpt/train/metrics.py) against a measured matmul
ceiling in the same precision. Ours and HF alternate step by step-block so machine load hits both alike.

    python -m bench.bench_train                 # both presets, with and without the malloc settings
    python -m bench.bench_train --presets tiny --malloc set   # quick
    python -m bench.bench_train --write         # also replace this benchmark's section in bench/README.md

glibc malloc settings (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, exported by the Makefile for training) apply
to both models alike; each setting runs in its own process (glibc reads them at start) and the table shows both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import write_section
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.train.metrics import flops_per_token, measure_matmul_flops

SHAPES = {"tiny": dict(batch_size=16, seq_len=128), "seed": dict(batch_size=4, seq_len=256)}


def hf_model(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, activation_function="gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_eps,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf_cfg).train()


def step_fn(model, kind: str, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            if kind == "ours":
                _, loss = model(x[:, :-1], labels=x, return_logits=False)  # the train stage's path (fused loss)
            else:
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_pair(preset: str, precision: str, steps: int) -> dict:
    cfg = ModelConfig.from_preset(preset, dropout=0.0)
    shape = SHAPES[preset]
    dtype = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(0)
    ours = DecoderOnlyTransformer(cfg).train()
    hf = hf_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (shape["batch_size"], shape["seq_len"] + 1))
    steps_of = {"ours": step_fn(ours, "ours", dtype), "hf": step_fn(hf, "hf", dtype)}
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for name in steps_of:  # warm-up (allocator, autocast caches)
        for _ in range(2):
            steps_of[name](x)
    for _ in range(steps):
        for name, step in steps_of.items():
            start = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - start)
    tokens = shape["batch_size"] * shape["seq_len"]
    fpt = flops_per_token(ours, cfg.n_layers, cfg.d_model, shape["seq_len"])
    row = {"preset": preset, "precision": precision, **shape, "params": ours.num_parameters(),
           "flops_per_token": fpt}
    for name, ts in times.items():
        tok_s = tokens / statistics.median(ts)
        row[f"{name}_tok_s"] = tok_s
        row[f"{name}_gflops"] = tok_s * fpt / 1e9
    row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
    return row


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def run_child(args: argparse.Namespace, malloc: bool, out: Path) -> list[dict]:
    """One measurement process (glibc reads the malloc variables only at process start)."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if malloc:
        env.update(MALLOC_ENV)
    cmd = [sys.executable, "-m", "bench.bench_train", "--child", "--out", str(out), "--presets", *args.presets,
           "--precisions", *args.precisions] + (["--steps", str(args.steps)] if args.steps else [])
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())["rows"]


def measure(args: argparse.Namespace) -> None:
    ceiling = {"fp32": measure_matmul_flops(torch.float32, 2048, 2.0),
               "bf16": measure_matmul_flops(torch.bfloat16, 2048, 2.0)}
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            steps = args.steps or (12 if preset == "tiny" else 3)
            row = bench_pair(preset, precision, steps)
            row["ceiling_gflops"] = ceiling[precision] / 1e9
            row["malloc_env"] = bool(os.environ.get("MALLOC_MMAP_THRESHOLD_"))
            rows.append(row)
            print(f"  {preset} {precision} malloc={row['malloc_env']}: ours {row['ours_tok_s']:,.0f} tok/s, "
                  f"HF {row['hf_tok_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))


def table(rows: list[dict], load_before: float, load_after: float) -> str:
    lines = [f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; load average {load_before:.1f} before / {load_after:.1f} after "
             "(the machine is shared: absolute numbers are noisy, ours/HF alternate step by step so the ratio "
             "less so). Step = forward + backward + AdamW; tiny 16×128, seed 4×256 tokens.",
             "",
             "| preset | precision | malloc env | ours tok/s | HF tok/s | ours/HF | ours GFLOP/s | HF GFLOP/s "
             "| matmul ceiling GFLOP/s | ours % of ceiling |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['precision']} | {'set' if r['malloc_env'] else 'unset'} | "
                     f"{r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['ratio']:.2f}× | {r['ours_gflops']:.0f} | "
                     f"{r['hf_gflops']:.0f} | {r['ceiling_gflops']:.0f} | "
                     f"{100 * r['ours_gflops'] / r['ceiling_gflops']:.0f}% |")
    ratios = [r["ratio"] for r in rows]
    lines += ["", f"ours/HF: {min(ratios):.2f}–{max(ratios):.2f}× (target ≥ 1.15×). The ceiling is a 2048² matmul "
                  "timed for 2 s in the same process; under load it is unreliable."]
    return "\n".join(lines)





def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "seed"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default: 12 tiny, 3 seed)")
    parser.add_argument("--malloc", choices=["both", "set", "unset"], default="both",
                        help="run with the glibc malloc settings, without, or both (one process each)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/out/train.json"))
    args = parser.parse_args()
    if args.child:
        measure(args)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = []
    for malloc in {"both": (True, False), "set": (True,), "unset": (False,)}[args.malloc]:
        rows += run_child(args, malloc, args.out.with_suffix(f".{'malloc' if malloc else 'plain'}.json"))
    rows.sort(key=lambda r: (r["preset"] != "tiny", r["precision"], not r["malloc_env"]))
    text = table(rows, load_before, os.getloadavg()[0])
    print(text)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    if args.write:
        write_section("train", "Training throughput: ours vs HF GPT2LMHeadModel (bench/bench_train.py)", text)


if __name__ == "__main__":
    main()
