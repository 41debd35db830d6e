"""Batch-1 CPU decode speed: ours vs llama.cpp on the same weights (issue 15 §2).

The seed config (93M parameters, random weights, vocab 65536) is written as our model directory and, through our
exporter (gpt/gguf.py), as GGUF files of matching precision: fp32 ↔ f32, bf16 ↔ bf16, int8 (`gpt quantize`) ↔
q8_0. Then, greedy, `--new-tokens` new tokens after a short prompt, in one run:
  - `gpt generate`: the user's path, a fresh `gpt generate -t 0` process (its own tokens/s line);
  - `gpt serve`: a real server process, one client: a `--new-tokens` completion minus a 1-token one over HTTP;
  - ours, warm Python API: gpt.model_dir.load + model.generate after a warm-up (no EOS stop);
  - llama.cpp through llama-cpp-python in a child process: prompt evaluated, then one `eval` per token with argmax
    of the logits (a warm-up pass first); this includes llama-cpp-python's small per-call Python overhead, so it is
    a slight underestimate of `llama-bench`'s tg number.
The four are interleaved: each of REPEATS rounds runs llama.cpp, `gpt generate`, `gpt serve` and the warm API once per
precision, and each rate is the best round, so a burst of load from other processes hits all four alike.
The warm API runs in a child process with the OpenMP wait policy `gpt generate` would choose at that moment
(gpt.cli.openmp_wait_policy: libgomp's spinning default when there are idle cores, PASSIVE when the machine is
busy), as `gpt serve` does. `--breakdown` adds where the time of one decode step goes (torch profiler over the
warm API: matmul kernels, attention, other tensor ops, sampling, Python/dispatch; plus detokenization).
Measure on an idle machine: with more runnable threads than cores, llama.cpp's per-op thread barriers collapse
(measured here under load average ~4 on 2 cores: f32 9 tok/s with 2 threads, 32 with 1), far more than torch.
Threads: `--threads` (default 2) for torch, `gpt generate --threads` and llama.cpp alike.

    python -m bench.bench_llamacpp                 # ~3-5 min on 2 quiet cores
    python -m bench.bench_llamacpp --write         # also replace this benchmark's section in bench/README.md
    python -m bench.bench_llamacpp --precisions fp32 --new-tokens 32
    python -m bench.bench_llamacpp --breakdown     # also the per-token time breakdown of our decode step

Needs llama-cpp-python (`pip install -c constraints.txt -e '.[llamacpp]'`, a C++ build of several minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bench.common import cpu_name, write_section
from gpt.gguf import write_gguf
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import Lineage, load, load_model, save_quantized, write_model_dir
from gpt.tokenizer import Tokenizer

PRECISIONS = {"fp32": ("f32", None), "bf16": ("bf16", "bf16"), "int8": ("q8_0", "int8")}  # ours → (gguf, quantize)
PROMPT = "The meaning of"
REPEATS = 3  # every rate is the best of 3 timed runs: other processes only ever slow a run down


def _tokenizer(work: Path, vocab_size: int) -> Path:
    """A sentencepiece BPE model with exactly the seed config's `vocab_size` pieces, so every id the random model
    emits decodes: 4,096 pieces learned from Python's docs, the rest unused control pieces (decode to "")."""
    import io
    import pydoc_data.topics

    import sentencepiece as spm

    learned = 4096
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(pydoc_data.topics.topics.values())), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        control_symbols=[f"<|unused{i}|>" for i in range(vocab_size - learned)], split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        input_sentence_size=0, num_threads=2, minloglevel=2)
    path = work / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def _model_dirs(work: Path, precisions: list[str]) -> dict[str, Path]:
    config = ModelConfig.from_preset("seed", dropout=0.0)
    tok_file = _tokenizer(work, config.vocab_size)
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(config).eval()
    fp32 = write_model_dir(model, work / "seed-fp32", tok_file, Lineage(step=0))
    dirs = {"fp32": fp32}
    for name in precisions:
        quant = PRECISIONS[name][1]
        if quant:
            dirs[name] = save_quantized(fp32, work / f"seed-{name}", quant)
    return dirs


def gpt_generate_rate(directory: Path, new_tokens: int, threads: int) -> float:
    """tokens/s that a fresh `gpt generate -t 0` prints for itself (its own OpenMP wait policy choice)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [sys.executable, "-m", "gpt.cli", "generate", "-c", str(directory), "-t", "0", "-m", str(new_tokens),
           "--threads", str(threads), PROMPT]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"gpt generate failed ({done.returncode}): {done.stderr[-1000:]}")
    err = done.stderr
    match = re.search(r"\[(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s\]", err)
    if not match:
        raise RuntimeError(f"no tokens/s line in gpt generate's output: {err[-500:]}")
    if int(match.group(1)) < new_tokens:
        print(f"  note: gpt generate stopped after {match.group(1)} tokens (EOS)", file=sys.stderr)
    return float(match.group(2))


def gpt_serve_rate(directory: Path, new_tokens: int, threads: int) -> float:
    """Decode tokens/s of a real `gpt serve` subprocess for one client (greedy, non-streamed HTTP completions):
    (time of a `new_tokens` completion − time of a 1-token one: prefill and the HTTP round trip) / (new_tokens − 1),
    best of 2."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [sys.executable, "-m", "gpt.cli", "serve", "-c", str(directory), "--port", str(port),
           "--max-tokens", str(new_tokens), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"

    def post(max_tokens: int) -> tuple[float, int]:
        body = json.dumps({"model": directory.name, "prompt": PROMPT, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            tokens = json.load(response)["usage"]["completion_tokens"]
        return time.perf_counter() - start, tokens

    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"gpt serve exited ({proc.returncode}): {' '.join(cmd)}") from None
                time.sleep(0.2)
        post(8)  # warm-up
        best = 0.0
        for _ in range(2):
            one, _ = post(1)
            many, tokens = post(new_tokens)
            if tokens < new_tokens:
                print(f"  note: gpt serve stopped after {tokens} tokens (EOS)", file=sys.stderr)
            best = max(best, (tokens - 1) / (many - one))
        return best
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ours_warm_rate(directory: Path, new_tokens: int, threads: int) -> float:
    """Greedy tokens/s of gpt.model_dir.load + model.generate after a warm-up completion (in a child process)."""
    torch.set_num_threads(threads)
    loaded = load(directory)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        loaded.model.generate(ids, 8, temperature=0.0)  # a warm-up beyond load's own
        start = time.perf_counter()
        out = loaded.model.generate(ids, new_tokens, temperature=0.0)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


MATMUL_OPS = ("addmv", "addmm", "mm", "mv", "linear_dynamic", "_weight_int8pack_mm", "bmm", "gpt::gemv_bf16")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention")
SAMPLING_OPS = ("argmax", "max", "topk", "multinomial", "softmax", "sort")


def decode_breakdown(directory: Path, new_tokens: int, threads: int) -> dict[str, float]:
    """ms per decode step of the warm API, split by the torch profiler's self time per op: matmul kernels,
    attention, sampling (argmax), other tensor ops; Python/dispatch = the unprofiled wall time minus all ops.
    Detokenization: gpt.generate.TextStream over the same tokens (what `gpt generate`/serve add per token)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from gpt import kernels
    from gpt.generate import TextStream

    native = kernels._call  # a ctypes call is invisible to the profiler: name it (only in this child process)

    def named_call(*args, **kw):
        with record_function("gpt::gemv_bf16"):
            return native(*args, **kw)

    kernels._call = named_call
    torch.set_num_threads(threads)
    loaded = load(directory)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    runs = []  # (wall ms per step unprofiled, profiled wall ms per step, profiler) of REPEATS tries
    with torch.inference_mode():
        loaded.model.generate(ids, 8, temperature=0.0)
        for _ in range(REPEATS):
            start = time.perf_counter()
            out = loaded.model.generate(ids, new_tokens, temperature=0.0)
            wall = (time.perf_counter() - start) * 1e3 / new_tokens
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                loaded.model.generate(ids, new_tokens, temperature=0.0)
                profiled = (time.perf_counter() - start) * 1e3 / new_tokens
            runs.append((wall, profiled, prof))
    wall, profiled, prof = min(runs, key=lambda run: run[1])  # the least disturbed profiled run
    parts = dict.fromkeys(("matmul", "attention", "sampling", "other ops"), 0.0)
    for event in prof.key_averages():
        name = event.key if event.key in MATMUL_OPS else event.key.removeprefix("aten::").removeprefix("quantized::")
        part = ("matmul" if name.rstrip("_") in MATMUL_OPS else "attention" if any(a in name for a in ATTENTION_OPS)
                else "sampling" if name in SAMPLING_OPS else "other ops")
        parts[part] += event.self_cpu_time_total / 1e3 / new_tokens
    parts["python/dispatch"] = max(0.0, profiled - sum(parts.values()))  # includes the profiler's own overhead
    parts["step, profiled"] = profiled
    stream = TextStream(loaded.tokenizer, ids[0].tolist())
    start = time.perf_counter()
    for token in out[0, ids.shape[1]:].tolist():
        stream.push([token])
    parts["detokenize"] = (time.perf_counter() - start) * 1e3 / new_tokens
    parts["step, unprofiled"] = min(run[0] for run in runs)
    return parts


BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1}  # int8: plus one float32 scale per row (counted)


def weight_bytes_per_token(model: DecoderOnlyTransformer, precision: str) -> int:
    """Bytes a decode step must read: every Linear weight once (the LM head tied to the embedding counted once;
    one embedding/position row and the norms are negligible), in `precision`'s storage."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out, inp = module.weight.shape
            total += out * inp * BYTES_PER_WEIGHT[precision] + (4 * out if precision == "int8" else 0)
    return total


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of torch.sum over `gib` GiB of float32 with `threads` threads: how fast this
    machine streams memory the decode step cannot keep in cache (the seed model's bf16 weights are 186 MB)."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2 ** 30) // 4)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


def _load_llama(gguf_path: Path, n_ctx: int, threads: int, extra_buffers: bool) -> object:
    """llama-cpp-python's Llama; extra_buffers=False loads weights without llama.cpp's repacking buffer types
    (needed for q8_0 on AMX CPUs, where the AMX path segfaults: ggml-org/llama.cpp#20824)."""
    import llama_cpp
    from llama_cpp import Llama

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                     logits_all=True, verbose=False)  # logits_all keeps `scores` (1 row per one-token eval)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "amx_int8" in cpuinfo.read_text()


def llama_cpp_rate(gguf_path: Path, prompt_ids: list[int], new_tokens: int, threads: int,
                   extra_buffers: bool) -> float:
    llm = _load_llama(gguf_path, len(prompt_ids) + new_tokens + 8, threads, extra_buffers)
    rate = 0.0
    for n in (min(16, new_tokens), new_tokens):  # a short first pass warms up (page cache, thread pool)
        llm.reset()
        llm.eval(prompt_ids)
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rate = n / (time.perf_counter() - start)
    return rate


def _in_child(fn, *args, wait_policy: str | None = None):
    """fn(*args) in a fresh process (llama.cpp's and torch's OpenMP thread pools in one process slow each other),
    with OMP_WAIT_POLICY=wait_policy (None: unset, libgomp's default)."""
    import multiprocessing

    saved = os.environ.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        os.environ["OMP_WAIT_POLICY"] = wait_policy
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)
        if saved is not None:
            os.environ["OMP_WAIT_POLICY"] = saved


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def markdown(rows: list[dict], info: str, breakdowns: dict[str, dict[str, float]], rounds: int = REPEATS,
             bandwidth: float | None = None) -> str:
    lines = [f"Seed config (93M parameters, random weights), batch 1, greedy, {rows[0]['new']} new tokens, "
             f"{rows[0]['threads']} threads; {rounds} interleaved rounds (llama.cpp, `gpt generate`, `gpt serve`, "
             f"warm API per precision), each rate the best round. {info}", "",
             "| precision (ours / GGUF) | llama.cpp tok/s | `gpt generate` tok/s | ratio | `gpt serve` tok/s | ratio "
             "| warm API tok/s | ratio | load (1/5/15 min) during the row |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} / {r['gguf']} | {r['llama']:.1f} | {r['cli']:.1f} | "
                     f"{r['cli'] / r['llama']:.2f} | {r['serve']:.1f} | {r['serve'] / r['llama']:.2f} | "
                     f"{r['warm']:.1f} | {r['warm'] / r['llama']:.2f} | {r['load']} |")
    if bandwidth:
        lines += ["", f"Memory-bandwidth limit: torch.sum streams {bandwidth / 1e9:.1f} GB/s over 1 GiB with "
                  f"{rows[0]['threads']} threads here; a step reads every weight once, so the limit is that rate "
                  "/ weight bytes per token:", "",
                  "| precision | weight MB per token | limit tok/s | `gpt generate` / limit | llama.cpp / limit |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            limit = bandwidth / r["bytes"]
            lines.append(f"| {r['precision']} | {r['bytes'] / 1e6:.0f} | {limit:.0f} | {r['cli'] / limit:.2f} | "
                         f"{r['llama'] / limit:.2f} |")
    if breakdowns:
        parts = list(next(iter(breakdowns.values())))
        lines += ["", "Where a decode step's time goes (warm API, ms per token, the least disturbed of "
                  f"{REPEATS} profiled runs: torch profiler self time per op; Python/dispatch = that run's wall "
                  "time minus all ops, so it includes the profiler's own overhead; detokenize = gpt.generate."
                  "TextStream per token; the fastest unprofiled step for comparison):", "",
                  "| precision | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
        for name, b in breakdowns.items():
            lines.append(f"| {name} | " + " | ".join(f"{b[k]:.2f}" for k in parts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from gpt.cli import openmp_wait_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=REPEATS, help=f"interleaved rounds (default {REPEATS})")
    parser.add_argument("--breakdown", action="store_true", help="also profile where a decode step's time goes")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = "set" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "not set"
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench_llamacpp.") as tmp:
        work = Path(tmp)
        dirs = _model_dirs(work, args.precisions)
        fp32 = load_model(dirs["fp32"])
        weight_bytes = {name: weight_bytes_per_token(fp32, name) for name in args.precisions}
        tok = Tokenizer.load(dirs["fp32"])
        prompt_ids = tok.encode(PROMPT)
        ggufs = {name: write_gguf(fp32, tok, work / f"seed-{PRECISIONS[name][0]}.gguf", PRECISIONS[name][0])
                 for name in args.precisions}
        del fp32
        rows = {name: {"precision": name, "gguf": PRECISIONS[name][0], "new": args.new_tokens,
                       "threads": args.threads, "llama": 0.0, "cli": 0.0, "serve": 0.0, "warm": 0.0, "loads": [],
                       "bytes": weight_bytes[name]}
                for name in args.precisions}
        policies = []
        for round_ in range(args.rounds):
            for name in args.precisions:
                row = rows[name]
                row["loads"].append(_load())
                repack = not (PRECISIONS[name][0] == "q8_0" and _has_amx())
                row["llama"] = max(row["llama"], _in_child(llama_cpp_rate, ggufs[name], prompt_ids,
                                                           args.new_tokens, args.threads, repack))
                row["cli"] = max(row["cli"], gpt_generate_rate(dirs[name], args.new_tokens, args.threads))
                row["serve"] = max(row["serve"], gpt_serve_rate(dirs[name], args.new_tokens, args.threads))
                policy = openmp_wait_policy(args.threads)
                policies.append(policy or "default")
                row["warm"] = max(row["warm"], _in_child(ours_warm_rate, dirs[name], args.new_tokens,
                                                         args.threads, wait_policy=policy))
                print(f"round {round_ + 1}: {name} llama.cpp {row['llama']:.1f}, gpt generate {row['cli']:.1f}, "
                      f"gpt serve {row['serve']:.1f}, "
                      f"warm {row['warm']:.1f} tok/s (best so far; load {row['loads'][-1]}, warm API policy "
                      f"{policies[-1]})", flush=True)
        bandwidth = _in_child(read_bandwidth, args.threads)
        print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
        breakdowns = {}
        if args.breakdown:
            for name in args.precisions:
                breakdowns[name] = _in_child(decode_breakdown, dirs[name], args.new_tokens, args.threads,
                                             wait_policy=openmp_wait_policy(args.threads))
                print(name, {k: round(v, 2) for k, v in breakdowns[name].items()}, flush=True)
    for row in rows.values():
        row["load"] = f"{row['loads'][0]} … {row['loads'][-1]}"
    info = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, MALLOC_* thresholds {malloc}, "
            f"load average (1/5/15 min) before {load_before}, after {_load()}; OpenMP wait policy of the warm API "
            f"runs (as `gpt generate` chose): {', '.join(sorted(set(policies)))}.")
    if "int8" in args.precisions and _has_amx():
        info += (" This CPU has AMX, where llama.cpp's repacked q8_0 path segfaults (ggml-org/llama.cpp#20824), so "
                 "its q8_0 runs without weight repacking (plain q8_0 kernels).")
    table = markdown(list(rows.values()), info, breakdowns, args.rounds, bandwidth)
    print(table)
    if args.write:
        write_section("llamacpp", "Decode speed vs llama.cpp (bench_llamacpp.py)", table)


if __name__ == "__main__":
    main()
