"""Tokenize-stage throughput (MB of text → shards per second) and peak memory vs plain sentencepiece `encode`.

    .venv/bin/python -m bench.bench_tokenize [--scales 1 8] [--repeats 3] [--threads 2]

Corpus: the built-in default (Python docs, through `prepare_corpus`), and copies of it K times larger. Tokenizer:
BPE with the default params, trained on the 1x corpus. Each measurement runs in a fresh process (so its peak RSS is
its own) with the same number of encode threads:

- ours: `tokenize_split` for train and val — reads Parquet, encodes, writes uint16 Arrow shards + manifests;
- peer: all texts already in a Python list, then one `SentencePieceProcessor.encode(texts, num_threads=N)` call
  (reading and writing not timed, to the peer's advantage);
- peer-numpy: the same with `encode_as_numpy` (no Python int lists).

Seconds are best of --repeats, timed inside the process after imports. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """This process's peak RSS. (ru_maxrss would not do: Linux carries the parent's peak across fork+exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, corpus: Path, tokenizer_dir: Path, threads: int, out: Path) -> dict:
    from gpt.data.corpus import SPLITS, read_corpus
    from gpt.data.tokenize import TokenizeConfig, tokenize_split
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    if mode == "ours":
        cfg = TokenizeConfig(num_threads=threads)
        start = time.perf_counter()
        manifests = [tokenize_split(tok, corpus, split, out / split, cfg) for split in SPLITS]
        seconds = time.perf_counter() - start
        num_bytes, tokens = sum(m["num_bytes"] for m in manifests), sum(m["num_tokens"] for m in manifests)
    else:
        texts = [t for split in SPLITS for b in read_corpus(corpus, split=split) for t in b.column("text").to_pylist()]
        num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        encode = tok.sp.encode if mode == "peer" else tok.sp.encode_as_numpy
        start = time.perf_counter()
        ids = encode(texts, num_threads=threads)
        seconds = time.perf_counter() - start
        tokens = sum(len(x) for x in ids) + len(ids)  # + one EOS per document, as in the shards
    return {"seconds": seconds, "bytes": num_bytes, "tokens": tokens, "peak_rss_mb": _peak_rss_mb()}


def build_corpora(root: Path, scales: list[int]) -> dict[int, Path]:
    from gpt.data.corpus import CorpusWriter, read_corpus
    from gpt.data.prepare import PrepareConfig, SourceConfig, prepare_corpus

    base = root / "corpus-1x"
    prepare_corpus(PrepareConfig(sources=[SourceConfig(kind="builtin")]), root / "no-raw", base)
    corpora = {1: base}
    for k in (s for s in scales if s != 1):
        with CorpusWriter(root / f"corpus-{k}x", rows_per_file=2000) as writer:
            for copy in range(k):
                for batch in read_corpus(base):
                    rows = batch.to_pylist()
                    for row in rows:
                        row["id"] = f"{row['id']}-{copy}"
                    writer.write(rows)
        corpora[k] = root / f"corpus-{k}x"
    return corpora


def run_child(mode: str, corpus: Path, tokenizer_dir: Path, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_tokenize", "--child", mode, "--corpus", str(corpus),
           "--tokenizer", str(tokenizer_dir), "--threads", str(threads), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", choices=["ours", "peer", "peer-numpy"])
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.tokenizer, args.threads, args.out)))
        return

    from gpt.tokenizer import TokenizerConfig, train_tokenizer, training_sentences

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpora = build_corpora(root, args.scales)
        train_tokenizer(training_sentences(corpora[1], TokenizerConfig()), TokenizerConfig(), root / "tok")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}; load before: {os.getloadavg()}; threads: {args.threads}")
        print(f"\n| corpus | MB | method | seconds (best of {args.repeats}) | MB/s | vs peer | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for k, corpus in sorted(corpora.items()):
            modes = ("ours", "peer", "peer-numpy")
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for i in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits every method
                for mode in modes:
                    runs[mode].append(run_child(mode, corpus, root / "tok", args.threads, root / f"s-{k}-{mode}-{i}"))
            results = {
                mode: min(rs, key=lambda r: r["seconds"]) | {"peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
                for mode, rs in runs.items()
            }
            peer_mbs = results["peer"]["bytes"] / 1e6 / results["peer"]["seconds"]
            for mode, r in results.items():
                mbs = r["bytes"] / 1e6 / r["seconds"]
                print(f"| {k}x | {r['bytes'] / 1e6:.1f} | {mode} | {r['seconds']:.2f} | {mbs:.2f} | "
                      f"{mbs / peer_mbs:.2f}x | {r['peak_rss_mb']:.0f} |")
            assert results["ours"]["tokens"] == results["peer"]["tokens"], "token counts differ"
        print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
