"""Tokenize-stage throughput (MB of text → shards per second) and peak memory vs plain sentencepiece `encode`.

    .venv/bin/python -m bench.bench_tokenize [--scales 1 8 16] [--write] [--repeats 3] [--threads 2]

Corpus: the built-in default (Python docs, through `prepare_corpus`), and copies of it K times larger. Tokenizer:
BPE with the default params, trained on the 1x corpus. Each measurement runs in a fresh process (so its peak RSS is
its own) with the same number of encode threads:

- ours: `tokenize_split` for train and val — reads Parquet, encodes, writes uint16 Arrow shards + manifests;
- peer: all texts already in a Python list, then one `SentencePieceProcessor.encode(texts, num_threads=N)` call
  (reading and writing not timed, to the peer's advantage);
- peer-numpy: the same with `encode_as_numpy` (no Python int lists).

Seconds are best of --repeats, timed inside the process after imports. Prints a Markdown table; --write puts it
in bench/README.md (section `tokenize`).
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

from bench.common import cpu_name, write_section


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


ABOUT = """`python -m bench.bench_tokenize` times the `tokenize` stage code (`tokenize_split` on train and val: read
Parquet, batch-encode on all cores, write uint16 Arrow shards + manifests) against plain sentencepiece on the same
texts, tokenizer and thread count: `peer` = one `SentencePieceProcessor.encode(texts, num_threads=N)` call on texts
already in memory (reading/writing not timed), `peer-numpy` = the same with `encode_as_numpy`. Corpus: the built-in
default (Python docs, cleaned by `prepare`) and copies of it K times larger; BPE with the default params. Each run
is a fresh process (peak RSS = its VmHWM); methods are interleaved and the best of N runs is shown.
Target from issue 3: ours >= 0.8x the peer's MB/s, and memory flat in corpus size.

Where the start-up went: before 2026-11-30 ours paid a one-time ~0.15-0.2 s that the peer (whose reading is
untimed) does not, so it was 0.69x on the small default corpus and ~1.0x once there was text to amortize it. It was
not Parquet or a process pool: the first conversion of a Python or NumPy object into Arrow (`pc.equal(column,
"train")` in the split filter, `pa.array(ids)` in the shard writer, `.to_numpy()` of a computed array) makes pyarrow
import pandas (measured: 0.15 s idle, 0.5-1.5 s on the loaded machine; `'pandas' in sys.modules` flips exactly
there). The stage now selects the split in Python, reads byte lengths from Arrow's offsets and wraps shard memory
with `pa.Array.from_buffers`, so pandas is never imported (tests/test_data_tokenize.py checks it in a fresh
process). Ours holds at most two batches (`tokenize.batch_bytes`, 8 MiB) of text and ids, so its peak memory stops
growing with corpus size; the peer holds every text and every id list."""





def measure(args, root: Path) -> list[str]:
    from gpt.tokenizer import TokenizerConfig, train_tokenizer, training_sentences

    corpora = build_corpora(root, args.scales)
    train_tokenizer(training_sentences(corpora[1], TokenizerConfig()), TokenizerConfig(), root / "tok")
    load = [round(x, 2) for x in os.getloadavg()]
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{args.threads} encode threads. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average before: {load}",
        "",
        f"| corpus | MB | method | seconds (best of {args.repeats}) | MB/s | vs peer | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    modes = ("ours", "peer", "peer-numpy")
    for k, corpus in sorted(corpora.items()):
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for i in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits every method
            for mode in modes:
                runs[mode].append(run_child(mode, corpus, root / "tok", args.threads, root / f"s-{k}-{mode}-{i}"))
        results = {
            mode: min(rs, key=lambda r: r["seconds"]) | {"peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
            for mode, rs in runs.items()
        }
        assert results["ours"]["tokens"] == results["peer"]["tokens"], "token counts differ"
        peer_mbs = results["peer"]["bytes"] / 1e6 / results["peer"]["seconds"]
        for mode, r in results.items():
            mbs = r["bytes"] / 1e6 / r["seconds"]
            lines.append(
                f"| {k}x | {r['bytes'] / 1e6:.1f} | {mode} | {r['seconds']:.2f} | {mbs:.2f} | "
                f"{mbs / peer_mbs:.2f}x | {r['peak_rss_mb']:.0f} |"
            )
    lines += ["", f"Load average after: {[round(x, 2) for x in os.getloadavg()]}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    parser.add_argument("--child", choices=["ours", "peer", "peer-numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.tokenizer, args.threads, args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        lines = measure(args, Path(tmp))
    print("\n".join(lines))
    if args.write:
        write_section("tokenize", "Tokenize stage vs plain sentencepiece (`bench/bench_tokenize.py`, issue 3)",
                      ABOUT + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
