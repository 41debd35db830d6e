"""Helpers every benchmark shares: the machine description and the bench/README.md section writer.

Each benchmark owns one section of bench/README.md, delimited by `<!-- bench:<name> -->` markers, so a rerun of
one benchmark (`--write`) replaces only its own table.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

README = Path(__file__).with_name("README.md")


def write_section(name: str, title: str, text: str) -> None:
    """Replace the `<!-- bench:name -->` section of bench/README.md (append it, or create the file, if missing)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{begin}\n## {title}\n\n{text}\n{end}"
    current = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(current, encoding="utf-8")
    os.replace(tmp, README)


def finish(result: dict, text: str, out: Path, write: bool, name: str, title: str) -> dict:
    """A benchmark's last step: print its table, keep the raw numbers as JSON in `out`, `--write` its section."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if write:
        write_section(name, title, text)
    return result


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
