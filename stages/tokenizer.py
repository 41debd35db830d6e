"""Stage `tokenizer`: sentencepiece BPE on the corpus's train split → `paths.tokenizer` + metrics/tokenizer.json.

Reads the augment stage's output (`paths.augmented`: the cleaned corpus plus its translations, or the cleaned
corpus unchanged when augmentation is off). With `train.init_from` set, the init model's tokenizer is copied
instead (its vocabulary is the model's).
"""

from __future__ import annotations

import time

from gpt.atomic import atomic_directory, write_json_atomic
from gpt.data.corpus import read_corpus
from gpt.errors import run_main
from gpt.params import load_params
from gpt.tokenizer import (
    Tokenizer,
    tokenizer_stats,
    train_tokenizer,
    training_sentences,
)
from gpt.train.init import copy_parent_tokenizer, parent_model


def main() -> None:
    params = load_params()  # the whole file: a slip in any section fails here, before any work
    paths, cfg = params.paths, params.tokenizer
    corpus = paths.augmented  # the augment stage's output (issue 5; C)
    start = time.perf_counter()
    if params.train.init_from:  # continued pretraining: the init model's own tokenizer, copied (gpt/train/init.py)
        parent = parent_model(params.train.init_from)
        sentences = []
        with atomic_directory(paths.tokenizer) as out:
            copy_parent_tokenizer(parent, out)
        tokenizer = Tokenizer.load(paths.tokenizer)
    else:
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
