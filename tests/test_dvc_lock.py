"""The committed dvc.lock matches the code: every code/params dependency hash it records equals the file on disk.

A stale lock makes `dvc status` on a fresh clone mark every stage changed and `dvc repro` rerun the whole pipeline;
this fails CI instead. Data dependencies (outputs of earlier stages, absent on a fresh clone) are not judged here —
`.ci/run` checks that `make repro` leaves `dvc status` clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_PREFIXES = ("data/", "metrics/")


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    if exe.is_file():
        return str(exe)
    found = shutil.which("dvc")
    if found is None:
        pytest.skip("dvc is not installed (make setup installs it)")
    return found


def stale_code_deps(status: dict) -> dict[str, list[str]]:
    """From `dvc status --json`: per stage, the changed dependencies that are code or params (not pipeline data)."""
    stale: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # e.g. "changed command" / "always changed"
                stale.setdefault(stage, []).append(str(change))
                continue
            for kind, entries in change.items():
                if kind == "changed outs":
                    continue
                if kind != "changed deps" or not isinstance(entries, dict):
                    stale.setdefault(stage, []).append(f"{kind}: {entries}")
                    continue
                for path, state in entries.items():
                    if not path.startswith(DATA_PREFIXES):
                        stale.setdefault(stage, []).append(f"{path}: {state}")
    return stale


def test_committed_dvc_lock_matches_code_and_params():
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([_dvc(), "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout or "{}")
    stale = stale_code_deps(status)
    assert not stale, ("dvc.lock is stale — run `make repro` and commit dvc.lock; changed: "
                       + "; ".join(f"{stage}: {', '.join(items)}" for stage, items in stale.items()))


def test_stale_code_dependency_is_reported():
    """The checker itself: a modified code dep or a changed command is reported; missing data is not."""
    status = {
        "train": [{"changed deps": {"gpt/config.py": "modified", "data/shards": "deleted"}},
                  {"changed outs": {"data/model": "not in cache"}}],
        "evaluate": [{"changed deps": {"data/model": "deleted"}}, "changed command"],
        "tokenize": [{"changed deps": {"params.yaml": {"tokenize.shard_tokens": "modified"}}}],
    }
    assert stale_code_deps(status) == {
        "train": ["gpt/config.py: modified"],
        "evaluate": ["changed command"],
        "tokenize": ["params.yaml: {'tokenize.shard_tokens': 'modified'}"],
    }
