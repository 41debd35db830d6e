"""SFT vs pretraining throughput at the same shapes: the same model, optimizer step and precision, fed plain token
windows (pretraining: `TokenShards`-style random windows) or packed conversations with assistant-only labels
(`gpt.sft.packing.PackedConversations` → `LabeledWindows`, about a third of the tokens scored). Both go through
`gpt.train.step.train_step` and the batch source's `get_batch`, like the training loop; blocks of steps alternate so
machine load hits both alike. Target (issue 13): SFT within 10% of pretraining tokens/s.

    python -m bench.bench_sft                 # tiny preset, batch 16 x 128, precision auto
    python -m bench.bench_sft --write         # also replace this benchmark's section in bench/README.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bench.common import write_section
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model.config import PRESETS
from gpt.sft.packing import PackedConversations
from gpt.train.device import Precision, resolve_precision
from gpt.train.step import train_step


class RandomWindows:
    """Pretraining-like source: windows drawn from a fixed token stream by (seed, step)."""

    def __init__(self, vocab: int, tokens: int = 1 << 20):
        self.stream = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))

    def get_batch(self, step, batch_size, seq_len, seed, rank=0, world_size=1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.stream) - seq_len - 1, (batch_size,), generator=g)
        return torch.stack([self.stream[s:s + seq_len + 1] for s in starts.tolist()])


def packed_source(vocab: int, seq_len: int, windows: int = 512) -> PackedConversations:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (windows, seq_len + 1))
    labels = np.where(rng.random((windows, seq_len + 1)) < 0.33, ids, -100)
    return PackedConversations(ids, labels)


def measure(args: argparse.Namespace) -> dict[str, float]:
    config = ModelConfig(**{**PRESETS[args.preset], "dropout": 0.0})
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    precision = Precision(resolve_precision(args.precision, torch.device("cpu")), "cpu")
    sources = {"pretraining": RandomWindows(config.vocab_size), "sft": packed_source(config.vocab_size, args.seq_len)}
    times: dict[str, list[float]] = {name: [] for name in sources}
    for block in range(args.blocks + 1):
        for name, source in sources.items():
            start = time.perf_counter()
            for step in range(args.steps):
                batch = source.get_batch(block * args.steps + step, args.batch_size, args.seq_len, seed=1)
                train_step(model, optimizer, [batch], precision, 1.0)
            if block:  # block 0 warms up
                times[name].append((time.perf_counter() - start) / args.steps)
    tokens = args.batch_size * args.seq_len
    result = {name: tokens / statistics.median(t) for name, t in times.items()}
    # the median of per-block ratios: neighbouring blocks share the machine's load of the moment
    result["ratio"] = statistics.median(p / s for p, s in zip(times["pretraining"], times["sft"], strict=True))
    result["precision"] = precision.name
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    r = measure(args)
    load = os.getloadavg()[0]
    table = (f"`python -m bench.bench_sft` ({args.preset}, batch {args.batch_size} x {args.seq_len}, "
             f"{r['precision']}, {torch.get_num_threads()} threads, load average {load:.1f} while it ran), "
             f"medians over {args.blocks} alternating blocks of {args.steps} steps:\n\n"
             "| source | tokens/s |\n|---|---|\n"
             f"| pretraining windows | {r['pretraining']:,.0f} |\n| SFT packed conversations (labels) | "
             f"{r['sft']:,.0f} |\n| ratio SFT / pretraining (median of per-block ratios) | {r['ratio']:.2f} |\n")
    print(table)
    if args.write:
        write_section("sft", "SFT vs pretraining throughput (`bench/bench_sft.py`, issue 13)", table)


if __name__ == "__main__":
    main()
