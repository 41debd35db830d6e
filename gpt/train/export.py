"""The trained-model directory (`paths.model`) that `evaluate`, the CLI and the server load.

  model.safetensors, config.json   gpt.checkpoint.save_model (load with gpt.checkpoint.load_model)
  tokenizer.model                  a copy, so the directory is self-contained
  lineage.json                     tokenizer sha256, shard manifest hashes, step, val loss, resolved params

Built in a temp directory beside the target and swapped in with renames, so readers never see a mix of two runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

TOKENIZER_FILE = "tokenizer.model"
LINEAGE_FILE = "lineage.json"


def export_model(model: nn.Module, directory: str | Path, tokenizer_file: str | Path,
                 lineage: dict[str, Any]) -> Path:
    """Write the model directory atomically; returns it."""
    from gpt.checkpoint import save_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        save_model(model, tmp, metadata={"step": lineage.get("step"), "val_loss": lineage.get("val_loss")})
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str) + "\n",
                                        encoding="utf-8")
        old = directory.parent / f".old-{directory.name}-{os.getpid()}"
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_lineage(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / LINEAGE_FILE).read_text(encoding="utf-8"))
