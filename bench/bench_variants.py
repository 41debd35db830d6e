"""Architecture variants at equal active parameters: GPT-2 block vs Qwen3-style vs MoE vs hybrid.

For each preset (all ~0.79M active non-embedding parameters per token, see gpt/model/config.py), on the
pipeline's token shards (`paths.shards`, built by `dvc repro tokenize`):
  - training tokens/s and validation loss after the same token budget (same data order, same optimizer,
    same learning-rate schedule; a deliberately plain loop so only the architecture differs);
  - batch-1 decode tokens/s (KV cache, fp32) and KV-cache bytes per token (GQA stores n_kv_heads of n_heads).

    python -m bench.bench_variants                      # ~2-3 min on 2 quiet cores
    python -m bench.bench_variants --write              # also replace this benchmark's section in bench/README.md
    python -m bench.bench_variants --steps 20 --presets tiny,moe
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from bench.bench_decode import machine
from bench.common import write_section
from gpt.data.shards import TokenShards
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.params import load_params

PRESET_LABELS = {"tiny": "gpt2 block (tiny)", "qwen3-style": "qwen3-style", "moe": "moe", "hybrid": "hybrid"}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, precision: str, batch_size: int) -> float:
    model.eval()
    losses = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        with autocast(precision):
            losses.append(model(w[:, :-1], labels=w)[1].float().item() * len(w))
    model.train()
    return sum(losses) / len(windows)


def decode_tok_s(model, vocab: int, new_tokens: int) -> float:
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    model.generate(ids, 4, temperature=0)
    start = time.perf_counter()
    model.generate(ids, new_tokens, temperature=0)
    return new_tokens / (time.perf_counter() - start)


def bench_preset(preset: str, train: TokenShards, val_windows: torch.Tensor, args) -> dict:
    torch.manual_seed(args.seed)
    config = ModelConfig.from_preset(preset, vocab_size=train.vocab_size, max_seq_len=args.seq_len)
    model = DecoderOnlyTransformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = train.get_batch(step, args.batch_size, args.seq_len, args.seed)
        with autocast(args.precision):
            _, loss = model(batch[:, :-1], labels=batch)  # includes the MoE aux loss in training mode
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    train_s = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.seq_len
    row = {
        "preset": preset, "params_total": model.num_parameters(),
        "params_active_non_embedding": model.num_parameters(active=True, non_embedding=True),
        "train_tokens": tokens, "train_tok_s": tokens / train_s,
        "val_loss": validation_loss(model, val_windows, args.precision, args.batch_size),
        "kv_bytes_per_token_fp32": 2 * config.n_layers * config.kv_heads * config.resolved_head_dim * 4,
    }
    model.eval()
    row["decode_tok_s"] = decode_tok_s(model, config.vocab_size, args.decode_tokens)
    if config.moe_n_experts:
        model(val_windows[:8, :-1])
        loads = [v for k, v in model.router_stats().items() if k.endswith(".load")]
        row["max_expert_load"] = max(loads)
    return row


NOTES = """Notes. Same data order, optimizer, schedule and seed for every preset; only the architecture differs. The
budget is small (a few minutes of CPU), so the val-loss ranking says which block learns fastest early, not which
is best at scale. "Active / token" excludes the embedding (same for all) and counts only the routed experts a token
uses. KV cache per token = 2 x layers x n_kv_heads x head_dim x 4 bytes: GQA with 2 of 4 KV heads halves it. MoE
decode at batch 1 pays for routing and per-expert calls on top of the same active weights, so it is slower here
although it reads no more weights per token."""


def markdown(rows: list[dict], info: dict, args) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads; "
        f"load average before/after: {info['load_before']} / {info['load_after']}. Training: {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens = {rows[0]['train_tokens']:,} tokens, AdamW lr {args.lr} "
        f"(warmup {args.warmup}, cosine), {args.precision}; validation on {args.val_windows_used} windows.",
        "",
        "| preset | params total | active / token (non-emb.) | train tok/s | val loss | decode tok/s (fp32, batch 1) "
        "| KV cache / token (fp32) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {PRESET_LABELS.get(r['preset'], r['preset'])} | {r['params_total'] / 1e6:.2f}M | "
            f"{r['params_active_non_embedding'] / 1e6:.3f}M | {r['train_tok_s']:,.0f} | {r['val_loss']:.3f} | "
            f"{r['decode_tok_s']:.0f} | {r['kv_bytes_per_token_fp32']:,} B |")
    return "\n".join(lines + ["", NOTES])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,qwen3-style,moe,hybrid")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--val-windows", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/out/variants.json"))
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shards = load_params().paths.shards
    train, val = TokenShards(shards / "train"), TokenShards(shards / "val")
    val_windows = torch.stack(list(val.iter_windows(args.seq_len, max_windows=args.val_windows))).long()
    args.val_windows_used = len(val_windows)
    info = machine()
    rows = []
    for preset in args.presets.split(","):
        rows.append(bench_preset(preset, train, val_windows, args))
        print(json.dumps(rows[-1]), flush=True)
    info["load_before"], info["load_after"] = info.pop("load_avg"), [round(x, 2) for x in os.getloadavg()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}
    args.json.write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=2))
    text = markdown(rows, info, args)
    print(text)
    if args.write:
        write_section("variants", "Architecture variants at equal active parameters (bench/bench_variants.py)", text)


if __name__ == "__main__":
    main()
