"""Stage `prepare`: the sources in params `prepare.sources` → `paths.cleaned` (Parquet parts) + metrics/prepare.json."""

from __future__ import annotations

import logging
import time

from gpt.atomic import write_json_atomic
from gpt.data.prepare import prepare_corpus
from gpt.errors import run_main
from gpt.params import load_params


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()  # the whole file: a slip in any section fails here, before any work
    paths, cfg = params.paths, params.prepare
    start = time.perf_counter()
    metrics = prepare_corpus(cfg, paths.raw, paths.cleaned)
    write_json_atomic(paths.metrics / "prepare.json", metrics)
    print(
        f"prepare: {metrics['documents_out']}/{metrics['documents_in']} documents, "
        f"{metrics['bytes_out'] / 1e6:.2f} MB -> {paths.cleaned} in {time.perf_counter() - start:.1f}s; "
        f"dropped {metrics['dropped']}"
    )


if __name__ == "__main__":
    run_main(main)
