"""Complete params files for tests: the project's params.yaml with a test's overrides deep-merged in.

`load_params` requires every section (a missing one is an error, not a silent fallback to code defaults), so a test
that writes its own params.yaml starts from the project's and changes only what it means to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def project_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's params.yaml as a mapping, with `overrides` deep-merged."""
    return deep_merge(yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8")), overrides or {})


def write_params(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write a complete params file at `path` (a directory gets `params.yaml` inside); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.yaml"
    path.write_text(yaml.safe_dump(project_params(overrides), sort_keys=False), encoding="utf-8")
    return path
