"""Stage `augment`: cleaned corpus → augmented corpus (originals + machine-translated train documents).

Reads `augment:` from params.yaml; paths from `paths:`. With `enabled: false` or `backend: none` the corpus is
copied through unchanged, so the DAG stays the same. Translations are cached in `paths.translation_cache`
(not a DVC output; see gpt/augment/cache.py). Writes metrics/augment.json.
"""

from __future__ import annotations

import logging

from gpt.atomic import write_json_atomic
from gpt.augment import augment_corpus
from gpt.errors import run_main
from gpt.params import load_params


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    params = load_params()  # the whole file: a slip in any section fails here, before any work
    paths, cfg = params.paths, params.augment
    metrics = augment_corpus(cfg, paths.cleaned, paths.augmented, paths.translation_cache)
    write_json_atomic(paths.metrics / "augment.json", metrics)
    print(
        f"augment: {metrics['documents_in']} documents in, {metrics['documents_translated']} translated "
        f"({metrics['cache_hits']} cache hits, {metrics['documents_failed']} failed, "
        f"{metrics['documents_skipped_lang']} skipped as not {cfg.src_lang}) → {paths.augmented}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
