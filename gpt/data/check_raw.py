"""`python -m gpt.data.check_raw [RAW_DIR]`: fail before `dvc repro` when paths.raw holds a dangling symbolic link.

DVC hashes `paths.raw` as the `prepare` stage's dependency before any stage runs, and a link whose target is gone
breaks `dvc status`/`dvc repro` with a message that does not say which link. `make repro` runs this first, so the
user reads the link's name and the fix instead. RAW_DIR defaults to params.yaml `paths.raw`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from gpt.config import PARAMS_FILE, ConfigError, PathsConfig, from_dict
from gpt.data.prepare import check_raw_dir
from gpt.errors import run_main


def raw_dir_from_params(path: Path = PARAMS_FILE) -> Path:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read paths.raw ({err})".replace("\n", " ")) from err
    return from_dict(PathsConfig, data.get("paths") if isinstance(data, dict) else None, "paths").raw


def main(raw_dir: str | None = None) -> None:
    check_raw_dir(Path(raw_dir) if raw_dir else raw_dir_from_params())


if __name__ == "__main__":
    run_main(lambda: main(*sys.argv[1:2]))
