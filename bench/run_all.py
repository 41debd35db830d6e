"""Run every benchmark in sequence and refresh its section of bench/README.md (`make bench`).

Benchmarks share the CPU with nothing else here, on purpose: run this on a quiet machine. Each script compares
against its peer in the same run and records the machine and load in its own section.
"""

from __future__ import annotations

import subprocess
import sys
import time

# (module, extra args): the scripts that can rewrite their section take --write
BENCHMARKS = [
    ("bench.bench_tokenize", ["--write"]),
    ("bench.bench_augment", ["--write"]),
    ("bench.bench_decode", ["--write"]),
    ("bench.bench_train", ["--write"]),
    ("bench.bench_quantize", ["--write"]),
    ("bench.bench_variants", ["--write"]),
    ("bench.bench_sft", ["--write"]),
]


def main(argv: list[str]) -> int:
    selected = [b for b in BENCHMARKS if not argv or any(name in b[0] for name in argv)]
    failed = []
    for module, args in selected:
        print(f"\n=== {module} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", module, *args])
        print(f"=== {module}: exit {code} after {time.perf_counter() - start:.0f}s", flush=True)
        if code:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
