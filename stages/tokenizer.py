"""Stage `tokenizer`: sentencepiece BPE on the corpus's train split → `paths.tokenizer` + metrics/tokenizer.json.

Reads the cleaned corpus (`paths.cleaned`); when the `augment` stage is in the pipeline, the augmented one.
"""

from __future__ import annotations

import time

from gpt.atomic import atomic_directory, write_json_atomic
from gpt.config import load_paths, load_section
from gpt.data.corpus import read_corpus
from gpt.errors import run_main
from gpt.tokenizer import (
    TokenizerConfig,
    tokenizer_stats,
    train_tokenizer,
    training_sentences,
)


def main() -> None:
    paths = load_paths()
    cfg = load_section("tokenizer", TokenizerConfig)
    corpus = paths.augmented  # the augment stage's output (issue 5; C)
    start = time.perf_counter()
    sentences = training_sentences(corpus, cfg)
    with atomic_directory(paths.tokenizer) as out:
        tokenizer = train_tokenizer(sentences, cfg, out)
    train_seconds = time.perf_counter() - start
    val_texts = (t for b in read_corpus(corpus, split="val", columns=["text"]) for t in b.column("text").to_pylist())
    stats = tokenizer_stats(tokenizer, val_texts)
    # no timings here: this file must be identical on every run (dvc.lock hashes it); tokenize.json has throughput
    metrics = {
        "vocab_size": tokenizer.vocab_size,
        "training_sentences": len(sentences),
        "val": stats,
    }
    write_json_atomic(paths.metrics / "tokenizer.json", metrics)
    print(
        f"tokenizer: vocab {tokenizer.vocab_size} from {len(sentences)} paragraphs in {train_seconds:.1f}s; val "
        f"{stats['bytes_per_token']:.2f} bytes/token, byte fallback {stats['byte_fallback_rate']:.4%}"
    )


if __name__ == "__main__":
    run_main(main)
