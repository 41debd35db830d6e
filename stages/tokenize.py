"""Stage `tokenize`: corpus train/val splits → Arrow token shards in `paths.shards` + metrics/tokenize.json.

Reads the augment stage's output (`paths.augmented`: the cleaned corpus plus its translations, or the cleaned
corpus unchanged when augmentation is off).
"""

from __future__ import annotations

import os
import time

from gpt.atomic import atomic_directory, write_json_atomic
from gpt.data.corpus import SPLITS
from gpt.data.tokenize import tokenize_split
from gpt.errors import run_main
from gpt.params import load_params
from gpt.tokenizer import Tokenizer


def main() -> None:
    params = load_params()  # the whole file: a slip in any section fails here, before any work
    paths, cfg = params.paths, params.tokenize
    tokenizer = Tokenizer.load(paths.tokenizer)
    corpus = paths.augmented  # the augment stage's output (issue 5; C)
    start = time.perf_counter()
    with atomic_directory(paths.shards) as out:
        manifests = {split: tokenize_split(tokenizer, corpus, split, out / split, cfg) for split in SPLITS}
    seconds = time.perf_counter() - start
    total_bytes = sum(m["num_bytes"] for m in manifests.values())
    total_tokens = sum(m["num_tokens"] for m in manifests.values())
    metrics = {
        split: {k: m[k] for k in ("num_tokens", "num_documents", "num_bytes")} | {"shards": len(m["shards"])}
        for split, m in manifests.items()
    }
    # throughput varies run to run, so this file's hash in dvc.lock does too (the shards' hashes do not)
    metrics["throughput"] = {
        "seconds": round(seconds, 3),
        "mb_per_second": round(total_bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_second": round(total_tokens / max(seconds, 1e-9)),
        "threads": cfg.num_threads if cfg.num_threads > 0 else os.cpu_count(),
    }
    write_json_atomic(paths.metrics / "tokenize.json", metrics)
    print(
        f"tokenize: {total_tokens} tokens ({total_bytes / 1e6:.2f} MB) in {seconds:.2f}s = "
        f"{metrics['throughput']['mb_per_second']:.2f} MB/s -> {paths.shards}"
    )


if __name__ == "__main__":
    run_main(main)
