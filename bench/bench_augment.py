"""Translation throughput (source characters/s) of each augment backend on this machine, through the real stage
code (`augment_corpus`, fresh cache each run), against a naive peer: one plain `apertium -u eng-spa` process per
document.

    .venv/bin/python -m bench.bench_augment [--docs 79] [--repeats 2] [--marian-model DIR]

Corpus: the `pydoc_data.topics` help texts that ship with Python (79 documents, ~0.5 MB of English). Prints a
Markdown table; `--write` replaces the `augment` section of bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import cpu_name, write_section
from gpt.augment import AugmentConfig, augment_corpus
from gpt.augment.marian import MarianConfig
from gpt.data.corpus import CorpusWriter


def corpus_rows(limit: int) -> list[dict]:
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items())][:limit]
    return [{"id": f"topic-{i}", "text": t, "source": "pydoc", "lang": "en", "split": "train"} for i, t in enumerate(texts)]


def naive_apertium(rows: list[dict]) -> float:
    """Seconds for one `apertium` process per document, sequentially (what a simple script would do)."""
    start = time.perf_counter()
    for row in rows:
        subprocess.run(["apertium", "-u", "eng-spa"], input=row["text"].encode(), capture_output=True, check=True)
    return time.perf_counter() - start


def stage_run(rows_dir: Path, cfg: AugmentConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return augment_corpus(cfg, rows_dir, Path(tmp) / "aug", Path(tmp) / "cache", progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=79)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per configuration")
    parser.add_argument("--marian-model", help="a local seq2seq model directory to include")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    args = parser.parse_args()
    rows = corpus_rows(args.docs)
    chars = sum(len(r["text"]) for r in rows)
    configs: list[tuple[str, AugmentConfig]] = []
    if shutil.which("apertium"):
        configs += [
            ("apertium, 1 worker, 64 docs/call", AugmentConfig(fraction=1.0, workers=1)),
            ("apertium, 2 workers, 64 docs/call", AugmentConfig(fraction=1.0, workers=2)),
            ("apertium, 2 workers, 1 doc/call", AugmentConfig(fraction=1.0, workers=2, batch_size=1)),
        ]
    if Path("/usr/share/dictd/freedict-eng-ind.index").is_file():
        configs.append(("dictionary eng→ind (FreeDict)", AugmentConfig(backend="dictionary", tgt_lang="id", fraction=1.0)))
    if args.marian_model:
        configs.append(("marian " + Path(args.marian_model).name,
                        AugmentConfig(backend="marian", tgt_lang="id", fraction=1.0,
                                      marian=MarianConfig(model=args.marian_model))))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "cleaned"
        with CorpusWriter(corpus) as writer:
            writer.write(rows)
        results = []
        peer = None
        if shutil.which("apertium"):
            peer = min(naive_apertium(rows) for _ in range(args.repeats))
            results.append(("peer: plain `apertium` per document, 1 process at a time", peer, None))
        for label, cfg in configs:
            best = min((stage_run(corpus, cfg) for _ in range(args.repeats)), key=lambda m: m["elapsed_s"])
            results.append((label, best["elapsed_s"], best))
    load = os.getloadavg()
    lines = [f"{len(rows)} documents, {chars / 1e3:.0f} kB; {cpu_name()}, {os.cpu_count()} cores; "
             f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; best of {args.repeats}", "",
             "| configuration | seconds | source chars/s | vs peer |", "|---|---:|---:|---:|"]
    for label, seconds, _ in results:
        ratio = f"{peer / seconds:.2f}×" if peer else "–"
        lines.append(f"| {label} | {seconds:.2f} | {chars / seconds:,.0f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("augment", "Translation augmentation throughput (`bench/bench_augment.py`, issue 5)", text)

if __name__ == "__main__":
    main()
