"""Batch-1 CPU decode speed: ours vs llama.cpp on the same weights (issue 15 §2).

The seed config (93M parameters, random weights, vocab 65536) is written as our model directory and, through our
exporter (gpt/gguf.py), as GGUF files of matching precision: fp32 ↔ f32, bf16 ↔ bf16, int8 (`gpt quantize`) ↔
q8_0. Then, greedy, `--new-tokens` new tokens after a short prompt, in one run:
  - `gpt generate`: the user's path, a fresh `gpt generate -t 0` process (its own tokens/s line);
  - ours, warm Python API: gpt.model_dir.load + model.generate after a warm-up (no EOS stop);
  - llama.cpp through llama-cpp-python in a child process: prompt evaluated, then one `eval` per token with argmax
    of the logits (a warm-up pass first); this includes llama-cpp-python's small per-call Python overhead, so it is
    a slight underestimate of `llama-bench`'s tg number.
Measure on an idle machine: with more runnable threads than cores, llama.cpp's per-op thread barriers collapse
(measured here under load average ~4 on 2 cores: f32 9 tok/s with 2 threads, 32 with 1), far more than torch.
Threads: `--threads` (default 2) for torch, `gpt generate --threads` and llama.cpp alike.

    python -m bench.bench_llamacpp                 # ~3-5 min on 2 quiet cores
    python -m bench.bench_llamacpp --write         # also replace this benchmark's section in bench/README.md
    python -m bench.bench_llamacpp --precisions fp32 --new-tokens 32

Needs llama-cpp-python (`pip install -c constraints.txt -e '.[llamacpp]'`, a C++ build of several minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import cpu_name, write_section
from gpt.gguf import write_gguf
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import Lineage, load, save_quantized, write_model_dir
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
    """tokens/s that a fresh `gpt generate -t 0` prints for itself (best of REPEATS runs)."""
    return max(_gpt_generate_once(directory, new_tokens, threads) for _ in range(REPEATS))


def _gpt_generate_once(directory: Path, new_tokens: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "gpt.cli", "generate", "-c", str(directory), "-t", "0", "-m", str(new_tokens),
           "--threads", str(threads), PROMPT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"gpt generate failed ({done.returncode}): {done.stderr[-1000:]}")
    err = done.stderr
    match = re.search(r"\[(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s\]", err)
    if not match:
        raise RuntimeError(f"no tokens/s line in gpt generate's output: {err[-500:]}")
    if int(match.group(1)) < new_tokens:
        print(f"  note: gpt generate stopped after {match.group(1)} tokens (EOS)", file=sys.stderr)
    return float(match.group(2))


def ours_warm_rate(directory: Path, new_tokens: int) -> float:
    loaded = load(directory)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    rates = []
    with torch.inference_mode():
        loaded.model.generate(ids, 8, temperature=0.0)  # warm-up: lazy kernels, allocator
        for _ in range(REPEATS):
            start = time.perf_counter()
            out = loaded.model.generate(ids, new_tokens, temperature=0.0)
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return max(rates)


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
    rates = []
    for _ in range(1 + REPEATS):  # the first pass warms up (page cache, thread pool)
        llm.reset()
        llm.eval(prompt_ids)
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rates.append(new_tokens / (time.perf_counter() - start))
    return max(rates[1:])


def _in_child(fn, *args):
    """fn(*args) in a fresh process: llama.cpp's and torch's OpenMP thread pools in one process slow each other."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def markdown(rows: list[dict], info: str) -> str:
    lines = [f"Seed config (93M parameters, random weights), batch 1, greedy, {rows[0]['new']} new tokens, "
             f"{rows[0]['threads']} threads, each rate the best of {REPEATS} runs. {info}", "",
             "| precision (ours / GGUF) | llama.cpp tok/s | `gpt generate` tok/s | ratio | warm API tok/s | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} / {r['gguf']} | {r['llama']:.1f} | {r['cli']:.1f} | "
                     f"{r['cli'] / r['llama']:.2f} | {r['warm']:.1f} | {r['warm'] / r['llama']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = "set" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "not set"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_llamacpp.") as tmp:
        work = Path(tmp)
        dirs = _model_dirs(work, args.precisions)
        fp32 = load(dirs["fp32"]).model
        tok = Tokenizer.load(dirs["fp32"])
        prompt_ids = tok.encode(PROMPT)
        for name in args.precisions:
            gguf_type = PRECISIONS[name][0]
            gguf_path = write_gguf(fp32, tok, work / f"seed-{gguf_type}.gguf", gguf_type)
            row = {"precision": name, "gguf": gguf_type, "new": args.new_tokens, "threads": args.threads,
                   "llama": _in_child(llama_cpp_rate, gguf_path, prompt_ids, args.new_tokens, args.threads,
                                      not (gguf_type == "q8_0" and _has_amx())),
                   "cli": gpt_generate_rate(dirs[name], args.new_tokens, args.threads),
                   "warm": ours_warm_rate(dirs[name], args.new_tokens)}
            print(row, flush=True)
            rows.append(row)
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    info = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, MALLOC_* thresholds {malloc}, "
            f"load average at the end {load_avg}.")
    if "int8" in args.precisions and _has_amx():
        info += (" This CPU has AMX, where llama.cpp's repacked q8_0 path segfaults (ggml-org/llama.cpp#20824), so "
                 "its q8_0 runs without weight repacking (plain q8_0 kernels).")
    table = markdown(rows, info)
    print(table)
    if args.write:
        write_section("llamacpp", "Decode speed vs llama.cpp (bench_llamacpp.py)", table)


if __name__ == "__main__":
    main()
