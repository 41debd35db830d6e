"""Serving throughput: continuous batching vs one generation at a time, through real HTTP.

For each server mode the real `gpt serve` runs as a subprocess (`--max-batch N`, N > 1: continuous batching;
`--max-batch 1`: the one-at-a-time worker) on the same random-weight model (a preset, the tokenizer of
`--tokenizer`), and 1, 4, 16 concurrent clients each send `--requests` completions (greedy, `--max-tokens` new
tokens, different prompts; `stream: true` and read to the end, as a chat UI does). Aggregate tokens/s = completion
tokens of all requests / wall time from the first request to the last answer; the ratio is batched / one at a time
at the same concurrency. Mean time to the first token is shown too. Both servers run at once and are measured in
turn, `--repeats` times each (the median is kept), so that a busy neighbour slows both alike.

    python -m bench.bench_serve                    # tiny preset, ~1-2 min on 2 cores
    python -m bench.bench_serve --preset seed      # the 93M seed model (slower)
    python -m bench.bench_serve --write            # also replace this benchmark's section in bench/README.md

The clients run in this process (threads, httpx), the server in its own, so on a small machine they share its
cores; the load average before the run is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import cpu_name, write_section

WORDS = "the model reads text and writes a story about cats dogs birds trees rivers on a quiet day".split()


def build_model_dir(preset: str, tokenizer: Path, root: Path) -> Path:
    """A random-weight model of `preset` with the tokenizer's vocabulary (seeded: every mode serves the same)."""
    import torch

    from gpt.model import DecoderOnlyTransformer, ModelConfig
    from gpt.model_dir import save_model
    from gpt.tokenizer import Tokenizer

    shutil.copy(tokenizer, root / "tokenizer.model")
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, vocab_size=Tokenizer.load(root).vocab_size)
    out = save_model(DecoderOnlyTransformer(config).eval(), root / preset)
    shutil.copy(tokenizer, out / "tokenizer.model")
    return out


class Server:
    """`gpt serve` in a subprocess on a free port."""

    def __init__(self, model_dir: Path, max_batch: int, threads: int | None, max_tokens: int, device: str):
        cmd = [sys.executable, "-m", "gpt.cli", "serve", "-c", str(model_dir), "--port", "0", "--device", device,
               "--max-batch", str(max_batch), "--max-tokens", str(max_tokens), "--max-queue", "256"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        self.url, log = None, []
        while time.time() < deadline and self.url is None:
            line = self.proc.stderr.readline()
            log.append(line)
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"gpt serve exited with {self.proc.returncode}: {''.join(log[-5:])}")
            if match := re.search(r"on (http://\S+?)/ ", line):
                self.url = match.group(1)
        if self.url is None:
            raise RuntimeError("gpt serve did not start within 120 s")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # drain its log

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """Stream one greedy completion to its end → (completion tokens, seconds to the first text)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - start


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `requests` completions one after another."""
    tokens, firsts, errors = [], [], []

    def client_loop(c: int) -> None:
        with httpx.Client() as client:
            for r in range(requests):
                prompt = " ".join(WORDS[(c * 7 + r * 3 + k) % len(WORDS)] for k in range(3 + (c + r) % 5))
                try:
                    n, first = one_request(client, url, prompt, max_tokens)
                    tokens.append(n)
                    firsts.append(first)
                except Exception as err:  # reported, not hidden
                    errors.append(repr(err))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "tokens": sum(tokens), "seconds": wall, "tok_s": sum(tokens) / wall,
            "first_token_s": sum(firsts) / max(1, len(firsts)), "errors": errors}


def run(args: argparse.Namespace) -> dict:
    """Both servers run side by side (an idle one waits without using the CPU); each concurrency is measured
    `repeats` times, alternating the modes, so a change in the machine's load hits both alike; medians are kept."""
    modes = {"one at a time": 1, "batched": args.max_batch}
    results: dict = {"modes": {name: [] for name in modes}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.preset, args.tokenizer, Path(tmp))
        servers = {name: Server(model_dir, max_batch, args.threads, args.max_tokens, args.device)
                   for name, max_batch in modes.items()}
        try:
            for server in servers.values():
                load(server.url, 1, 1, 8)  # warm-up
            for clients in args.clients:
                runs: dict[str, list[dict]] = {name: [] for name in modes}
                for _ in range(args.repeats):
                    for name, server in servers.items():
                        runs[name].append(load(server.url, clients, args.requests, args.max_tokens))
                for name, rows in runs.items():
                    row = sorted(rows, key=lambda r: r["tok_s"])[len(rows) // 2]  # the median run
                    results["modes"][name].append(row)
                    each = ", ".join(f"{r['tok_s']:.0f}" for r in rows)
                    errors = sum(len(r["errors"]) for r in rows)
                    print(f"{name:>14} clients {clients:>2}: {row['tok_s']:8.1f} tok/s (runs: {each})  first token "
                          f"{row['first_token_s'] * 1000:7.0f} ms  ({row['tokens']} tokens, {row['seconds']:.1f} s"
                          f"{f', errors: {errors}' if errors else ''})", flush=True)
        finally:
            for server in servers.values():
                server.close()
    return results


def table(results: dict, machine: str) -> str:
    one, batched = results["modes"]["one at a time"], results["modes"]["batched"]
    lines = ["| concurrent clients | one at a time (tok/s) | batched (tok/s) | ratio | first token: one at a time / "
             "batched (ms) |", "|---|---|---|---|---|"]
    for a, b in zip(one, batched):
        lines.append(f"| {a['clients']} | {a['tok_s']:.0f} | {b['tok_s']:.0f} | {b['tok_s'] / a['tok_s']:.2f}x | "
                     f"{a['first_token_s'] * 1000:.0f} / {b['first_token_s'] * 1000:.0f} |")
    return "\n".join(lines) + "\n\n" + machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokenizer", type=Path, default=Path("data/model/tokenizer.model"),
                        help="a sentencepiece model (default: the pipeline's, data/model/tokenizer.model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="completions per client (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, modes alternating (median kept)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="the server's --device (default: cpu)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args()
    if not args.tokenizer.exists():
        sys.exit(f"error: {args.tokenizer} not found; give --tokenizer (any sentencepiece .model)")
    load_before = os.getloadavg()
    results = run(args)
    machine = (f"{args.preset} preset, random weights, device {args.device}; {args.requests} streamed greedy completions of up to "
               f"{args.max_tokens} tokens per client; batched = `--max-batch {args.max_batch}`; median of "
               f"{args.repeats} runs, the two servers measured in turn. Machine: "
               f"{cpu_name()}, {os.cpu_count()} cores (shared with other work: load average "
               f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after); server and clients on the same "
               "machine.")
    text = table(results, machine)
    print("\n" + text)
    if args.write:
        write_section("serve", "Serving: continuous batching vs one at a time (bench/bench_serve.py, issue 15)",
                      "`python -m bench.bench_serve --write`\n\n" + text)


if __name__ == "__main__":
    main()
