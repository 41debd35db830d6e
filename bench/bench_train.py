"""Training throughput: our DecoderOnlyTransformer vs Hugging Face GPT2LMHeadModel (SDPA attention).

Identical shapes (vocab, width, depth, heads, context, tied embeddings, no dropout), identical step:
forward + backward + AdamW, fp32 and bf16 autocast, for the `tiny` and `seed` presets. Reports tokens/s, the
ratio ours/HF, and achieved GFLOP/s (PaLM FLOPs/token, see gpt/train/metrics.py) against a measured matmul
ceiling in the same precision. Ours and HF alternate step by step-block so machine load hits both alike.

    python -m bench.bench_train                 # both presets
    python -m bench.bench_train --presets tiny  # quick

glibc malloc settings (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, exported by the Makefile) apply to both
models equally when set; the table says whether they were set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

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
                _, loss = model(x[:, :-1], targets=x[:, 1:])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "seed"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default: 12 tiny, 4 seed)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/train.json"))
    args = parser.parse_args()
    ceiling = {"fp32": measure_matmul_flops(torch.float32, 2048, 2.0),
               "bf16": measure_matmul_flops(torch.bfloat16, 2048, 2.0)}
    malloc = bool(os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, load {os.getloadavg()[0]:.2f}, malloc env {'set' if malloc else 'unset'}")
    print(f"# matmul ceiling (2048², measured): fp32 {ceiling['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {ceiling['bf16'] / 1e9:.0f} GFLOP/s")
    print("| preset | precision | batch×seq | ours tok/s | HF tok/s | ours/HF | ours GFLOP/s (% of ceiling) "
          "| HF GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            steps = args.steps or (12 if preset == "tiny" else 4)
            row = bench_pair(preset, precision, steps)
            row["ceiling_gflops"] = ceiling[precision] / 1e9
            rows.append(row)
            print(f"| {preset} | {precision} | {row['batch_size']}×{row['seq_len']} | {row['ours_tok_s']:,.0f} | "
                  f"{row['hf_tok_s']:,.0f} | {row['ratio']:.2f}× | {row['ours_gflops']:.0f} "
                  f"({100 * row['ours_gflops'] / row['ceiling_gflops']:.0f}%) | {row['hf_gflops']:.0f} |",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"malloc_env": malloc, "load": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
