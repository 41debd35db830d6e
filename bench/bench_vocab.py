"""Which tokenizer vocabulary size gives the default (tiny) model the best validation bits per byte?

    .venv/bin/python -m bench.bench_vocab [--vocab 2048 4096 8192] [--steps 500] [--corpus data/augmented] [--write]

For each size: train the BPE tokenizer (default params otherwise) on the corpus's train split, tokenize both
splits, train the `tiny` preset for --steps AdamW steps of batch x seq_len tokens (same token budget for every
size, cosine schedule, the train stage's default lr), then score the whole validation split. Bits per byte =
summed next-token loss (nats) / ln 2 / UTF-8 bytes of the scored text, so it compares across vocabularies.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch


def val_bits_per_byte(model, shards, seq_len: int) -> float:
    nats, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for window in shards.iter_windows(seq_len):
            _, loss = model(window[None, :-1], labels=window[None])
            nats += loss.item() * seq_len
            tokens += seq_len
    scored_bytes = shards.num_bytes * tokens / max(1, shards.num_tokens - 1)  # bytes of the predicted tokens
    return nats / math.log(2) / scored_bytes


def run(vocab_size: int, corpus: Path, steps: int, batch: int, seq_len: int, lr: float, root: Path) -> dict:
    from gpt.data.shards import TokenShards
    from gpt.data.tokenize import TokenizeConfig, tokenize_split
    from gpt.model import DecoderOnlyTransformer, ModelConfig
    from gpt.tokenizer import TokenizerConfig, train_tokenizer, training_sentences

    cfg = TokenizerConfig(vocab_size=vocab_size)
    tok = train_tokenizer(training_sentences(corpus, cfg), cfg, root / f"tok-{vocab_size}")
    for split in ("train", "val"):
        tokenize_split(tok, corpus, split, root / f"shards-{vocab_size}" / split, TokenizeConfig())
    train = TokenShards(root / f"shards-{vocab_size}" / "train")
    val = TokenShards(root / f"shards-{vocab_size}" / "val")
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = steps // 10
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        window = train.get_batch(step, batch, seq_len, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(window[:, :-1], labels=window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    return {
        "vocab": vocab_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_bytes_per_token": train.num_bytes / train.num_tokens,
        "epochs": steps * batch * seq_len / train.num_tokens,
        "train_loss": loss.item(),
        "val_bpb": val_bits_per_byte(model, val, seq_len),
        "seconds": seconds,
    }


ABOUT = """`python -m bench.bench_vocab` (an experiment, ~5-10 min per vocabulary size on 2 cores — not part of a quick
benchmark pass) trains the BPE tokenizer at each size on the augmented corpus, tokenizes it, trains the `tiny` model
preset for the same number of steps and tokens per step (the train stage's defaults: lr 3e-3, batch 16 x 128,
AdamW, cosine, bf16 autocast) and scores the whole validation split in bits per byte (summed loss / ln 2 / UTF-8
bytes), which compares across vocabularies. It chose the default `tokenizer.vocab_size`."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--corpus", type=Path, default=Path("data/augmented"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3.0e-3)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lines = [
        f"Corpus {args.corpus}; {args.steps} steps x {args.batch} x {args.seq_len} tokens; {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before: "
        f"{[round(x, 2) for x in os.getloadavg()]}",
        "",
        "| vocab | params (M) | train bytes/token | epochs | final train loss | val bits/byte | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.vocab:
            r = run(v, args.corpus, args.steps, args.batch, args.seq_len, args.lr, Path(tmp))
            lines.append(
                f"| {r['vocab']} | {r['params_m']:.2f} | {r['train_bytes_per_token']:.2f} | {r['epochs']:.2f} | "
                f"{r['train_loss']:.3f} | {r['val_bpb']:.3f} | {r['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Load average after: {[round(x, 2) for x in os.getloadavg()]}."]
    print(lines[-1])
    if args.write:
        from bench.common import write_section

        write_section("vocab", "Tokenizer vocabulary size vs tiny-model bits per byte (`bench/bench_vocab.py`)",
                      ABOUT + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
