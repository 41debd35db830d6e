"""Training checkpoints: everything needed to continue a run exactly, written atomically, without pickle.

One checkpoint is a directory `step-NNNNNN/`:
  model.safetensors      weights, tied weights stored once  } written by gpt.checkpoint.save_model, so a
  config.json            the model config                   } checkpoint also loads with gpt.checkpoint.load_model
  optimizer.safetensors  every optimizer state tensor, flattened to `state.<param index>.<name>`
  rng.safetensors        torch CPU (and CUDA) generator states as uint8 tensors
  state.json             step, data position, schedule, optimizer hyper-parameters, scaler, python/numpy RNG,
                         val loss, resolved params, run fingerprint and lineage (tokenizer + shard manifest hashes)

A checkpoint is written into a hidden temp directory and renamed into place, so a directory named `step-*` is
always complete; a crash leaves at most a `.tmp-*` directory, removed on the next start. The manager keeps the
last `keep_last` checkpoints plus the one with the best validation loss.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from gpt.errors import GptError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


class ResumeError(GptError, RuntimeError):
    """A checkpoint can't be used to continue this run (params changed under resume: strict, or it is damaged)."""


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() into tensors (for safetensors) and JSON-safe scalars."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_to_flat`: a state dict for optimizer.load_state_dict()."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[v for v in np_state[2:]]],
    }
    return tensors, meta


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _save_weights(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        from gpt.checkpoint import save_model  # the project's model format (weights + config.json)

        save_model(model, directory)
    else:  # any other nn.Module (tests): plain safetensors, shared tensors once
        safetensors.torch.save_model(model, str(directory / "model.safetensors"))


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load weights in place; keys absent from the file must be aliases of loaded tensors (tied weights)."""
    state = safetensors.torch.load_file(str(path))
    live = model.state_dict()
    unexpected = sorted(set(state) - set(live))
    loaded_ptrs = {live[k].data_ptr() for k in state if k in live}
    missing = sorted(k for k in set(live) - set(state) if live[k].data_ptr() not in loaded_ptrs)
    if missing or unexpected:
        raise ResumeError(f"{path}: weights don't match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=False)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class CheckpointManager:
    """Save, find, load and prune `step-NNNNNN/` checkpoints under one directory."""

    def __init__(self, directory: str | Path, keep_last: int = 2, keep_best: bool = True):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best

    def steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / "state.json").is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1][1] if steps else None

    def read_state(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ResumeError(f"checkpoint {path}: unreadable state.json ({err})") from err

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Write checkpoint `step-<state['step']>` atomically, then prune old ones. Returns its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{state['step']:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.directory))
        try:
            _save_weights(model, tmp)
            opt_tensors, opt_meta = optimizer_to_flat(optimizer)
            safetensors.torch.save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            rng_tensors, rng_meta = rng_to_flat()
            safetensors.torch.save_file(rng_tensors, str(tmp / "rng.safetensors"))
            _write_json(tmp / "state.json", {**state, "optimizer": opt_meta, "rng": rng_meta})
            if final.exists():  # re-saving a step (e.g. after resuming at the very end): swap, then drop the old one
                trash = self.directory / f".old-{final.name}-{os.getpid()}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.prune()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Load weights (and optimizer, RNG) from checkpoint `path` into live objects; returns its state.json."""
        state = self.read_state(path)
        _load_weights(model, path / "model.safetensors")
        if optimizer is not None:
            tensors = safetensors.torch.load_file(str(path / "optimizer.safetensors"))
            optimizer.load_state_dict(optimizer_from_flat(tensors, state["optimizer"]))
        if restore_rng:
            rng_from_flat(safetensors.torch.load_file(str(path / "rng.safetensors")), state["rng"])
        return state

    def best(self) -> Path | None:
        scored = []
        for step, path in self.steps():
            val = self.read_state(path).get("val_loss")
            if val is not None:
                scored.append((val, step, path))
        return min(scored)[2] if scored else None

    def prune(self) -> None:
        """Keep the last `keep_last` checkpoints and (if keep_best) the best by val loss; remove stale temp dirs."""
        steps = self.steps()
        keep = {path for _, path in steps[-self.keep_last:]}
        if self.keep_best and (best := self.best()) is not None:
            keep.add(best)
        for _, path in steps:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def clean_temp(self) -> None:
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(path, ignore_errors=True)

    def clear(self) -> None:
        """Remove every checkpoint (a fresh start after params changed)."""
        self.clean_temp()
        for _, path in self.steps():
            shutil.rmtree(path, ignore_errors=True)
