"""Stage `sft_data`: your conversation files + docstring Q&A + generated tasks → `paths.sft_data` + metrics/sft_data.json."""

from __future__ import annotations

import time

from gpt.atomic import write_json_atomic
from gpt.errors import run_main
from gpt.params import load_params
from gpt.sft.build import build_sft_data


def main() -> None:
    params = load_params()  # the whole file: a slip in any section fails here, before any work
    paths = params.paths
    start = time.perf_counter()
    metrics = build_sft_data(params.sft_data, paths.cleaned, paths.conversations, paths.sft_data)
    write_json_atomic(paths.metrics / "sft_data.json", metrics)
    convs = metrics["conversations"]
    print(
        f"sft_data: {convs['train']} train + {convs['val']} val conversations, {metrics['heldout']} held-out tasks "
        f"-> {paths.sft_data} in {time.perf_counter() - start:.1f}s; skipped {metrics['skipped']}"
    )


if __name__ == "__main__":
    run_main(main)
