"""Training checkpoints: the one owner of `paths.checkpoints` — write, verify, find, load, prune, set aside.

One checkpoint is a directory `step-NNNNNN/`:
  model.safetensors      weights, tied weights stored once  } written by gpt.model_dir.save_model, so a
  config.json            the model config                   } checkpoint also loads with gpt.model_dir.load_model
  optimizer.safetensors  every optimizer state tensor, flattened to `state.<param index>.<name>`
  rng.safetensors        torch CPU (and CUDA) generator states as uint8 tensors
  tokenizer.model        a copy of the run's tokenizer (when the manager is given it), so `gpt generate`/`gpt info`
                         use a checkpoint like a model directory
  state.json             step, data position, schedule, optimizer hyper-parameters, scaler, python/numpy RNG,
                         val loss, resolved params, run fingerprint and lineage (tokenizer + shard manifest hashes),
                         and the size + sha256 of every other file (`files`), recorded at write time

Under FSDP (gpt/train/fsdp.py) a checkpoint is sharded instead: `shards/` holds one safetensors file per rank
(torch.distributed.checkpoint), state.json says `"format": "sharded"` and records every shard file's size and sha256
like the other files; it resumes on any number of ranks, or on one process (reshard on load). There is no
model.safetensors in it: the run's final model is exported whole.

The directory is built beside its final name and renamed into place through gpt.atomic (every file and both
parents fsynced), so a `step-*` directory with a state.json is complete unless the disk damaged it afterwards —
which `verify` detects from the recorded sizes and hashes. A damaged checkpoint is renamed
`step-NNNNNN.damaged-<n>` (kept for inspection, never deleted by this code) and the run falls back to an older one.

Checkpoints of other runs (another fingerprint: params, data or code changed) are never deleted on a params change:
they move to `runs/<fingerprint[:16]>/step-*`, and only the `keep_other_runs` most recently moved run folders are
kept. Which checkpoint a run continues from is decided in gpt/train/resume.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from gpt.atomic import TEMP_SUFFIX, atomic_directory, remove_stale_temps, write_atomic, write_text_atomic
from gpt.errors import GptError
from gpt.model_dir import WEIGHTS_FILE, save_model
from gpt.tokenizer import copy_tokenizer
from gpt.train.distributed import DistInfo, broadcast_object
from gpt.train.fsdp import SHARDS_DIR, read_shards, write_shards

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"
MODEL_FILE = WEIGHTS_FILE  # the weights (+ config.json) are written in gpt.model_dir's format
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
RUNS_DIR = "runs"  # other runs' checkpoints, one folder per fingerprint
DAMAGED = ".damaged-"  # `step-000400.damaged-1`: set aside after failing verification
LEGACY_TEMP_PREFIXES = (".tmp-", ".old-")  # temp names of the writers before gpt.atomic


class ResumeError(GptError, RuntimeError):
    """A checkpoint can't be used to continue this run (params changed under resume: strict, or it is damaged)."""


class CheckpointDamaged(ResumeError):
    """A checkpoint's files don't match the sizes/hashes its state.json recorded (or state.json is unreadable)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = path, reason


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of one file (what state.json records and `verify` checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def remove_leftovers(target: Path) -> list[Path]:
    """Delete temp files/dirs a killed writer of `target` left beside it: gpt.atomic's `.<name>.*.tmp` and the
    older writers' `.tmp-<name>-*` / `.old-<name>-*`. Returns what was removed."""
    target = Path(target)
    removed = remove_stale_temps(target.parent, target.name)
    if target.parent.is_dir():
        for prefix in LEGACY_TEMP_PREFIXES:
            for path in target.parent.glob(f"{prefix}{target.name}-*"):
                _remove(path)
                removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of an interrupted write: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def _remove(path: Path) -> None:
    """Delete a file or tree; a tree is first renamed to a temp name, so a kill mid-delete leaves only a temp."""
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.deleting-{os.getpid()}{TEMP_SUFFIX}")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        save_model(model, directory)
    else:  # any other nn.Module (tests): plain safetensors, shared tensors once
        write_atomic(directory / MODEL_FILE, lambda name: safetensors.torch.save_model(model, name))


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


def is_sharded(state: dict[str, Any]) -> bool:
    """A checkpoint written by FSDP ranks (shards/ through DCP) rather than whole by one process."""
    return state.get("format") == "sharded"


def _step_of(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


class CheckpointManager:
    """Save, verify, find, load, prune and move aside `step-NNNNNN/` checkpoints under one directory."""

    def __init__(self, directory: str | Path, keep_last: int = 2, keep_best: bool = True, keep_other_runs: int = 3,
                 tokenizer_dir: str | Path | None = None):
        self.directory = Path(directory)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.keep_other_runs = keep_other_runs

    # ---- finding ----
    def steps(self, directory: Path | None = None) -> list[tuple[int, Path]]:
        """Checkpoints with a state file (in `directory`, default the top level), oldest first."""
        directory = directory or self.directory
        if not directory.is_dir():
            return []
        found = [(step, path) for path in directory.iterdir()
                 if (step := _step_of(path)) is not None and (path / STATE_FILE).is_file()]
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1][1] if steps else None

    def run_folders(self) -> list[Path]:
        """Other runs' folders under runs/, most recently moved first."""
        runs = self.directory / RUNS_DIR
        if not runs.is_dir():
            return []
        return sorted((p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def read_state(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointDamaged(path, f"unreadable {STATE_FILE} ({err})") from err

    def verify(self, path: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every file against the size and sha256 recorded at write time; returns the state.

        Raises CheckpointDamaged naming the first file that is missing, truncated or changed."""
        state = self.read_state(path) if state is None else state
        files = state.get("files")
        files = files if isinstance(files, dict) else {}
        weights = [n for n in files if n.startswith(f"{SHARDS_DIR}/")] if is_sharded(state) else [MODEL_FILE]
        if not weights or not all(n in files for n in weights):
            raise CheckpointDamaged(path, f"{STATE_FILE} records no file sizes/hashes (written by an older version)")
        for name, expected in sorted(files.items()):
            file = path / name
            if not file.is_file():
                raise CheckpointDamaged(path, f"{name} is missing")
            size = file.stat().st_size
            if size != expected["size"]:
                raise CheckpointDamaged(path, f"{name} is {size} bytes, {expected['size']} were written")
            if file_digest(file)["sha256"] != expected["sha256"]:
                raise CheckpointDamaged(path, f"{name} has changed since it was written (sha256 differs)")
        return state

    def best(self) -> Path | None:
        scored = []
        for step, path in self.steps():
            try:
                val = self.read_state(path).get("val_loss")
            except CheckpointDamaged:
                continue
            if val is not None:
                scored.append((val, step, path))
        return min(scored)[2] if scored else None

    # ---- writing ----
    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Write checkpoint `step-<state['step']>` atomically (fsynced), then prune old ones. Returns its path."""
        final = self.directory / f"step-{state['step']:06d}"
        with atomic_directory(final) as tmp:
            _save_weights(model, tmp)
            if self.tokenizer_dir is not None:
                copy_tokenizer(self.tokenizer_dir, tmp)
            opt_tensors, opt_meta = optimizer_to_flat(optimizer)
            write_atomic(tmp / OPTIMIZER_FILE, lambda name: safetensors.torch.save_file(opt_tensors, name))
            rng_tensors, rng_meta = rng_to_flat()
            write_atomic(tmp / RNG_FILE, lambda name: safetensors.torch.save_file(rng_tensors, name))
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            document = {**state, "optimizer": opt_meta, "rng": rng_meta, "files": files}  # state.json last
            write_text_atomic(tmp / STATE_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
        self.prune()
        return final

    def save_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                     info: DistInfo) -> Path | None:
        """Collective (every rank calls it): write a sharded checkpoint — each rank its shard file, rank 0 the rest
        (tokenizer, RNG, state.json with every file's size and hash) — atomically, then prune. Rank 0 gets its
        path, the others None. A rank that fails (or is killed) mid-write fails the save on every rank; the temp
        directory left behind is removed on the next start (clean_leftovers)."""
        final = self.directory / f"step-{state['step']:06d}"
        if not info.is_main:
            write_shards(Path(broadcast_object(None, info)) / SHARDS_DIR, model, optimizer)
            return None
        with atomic_directory(final) as tmp:
            broadcast_object(str(tmp), info)
            opt_meta = write_shards(tmp / SHARDS_DIR, model, optimizer)
            found = len(list((tmp / SHARDS_DIR).glob("*.safetensors")))
            if found < info.world_size:  # the other ranks wrote into a directory of the same name elsewhere
                raise ResumeError(f"{final}: {found} shard file(s) where {info.world_size} ranks wrote one each: "
                                  "paths.checkpoints must be on a filesystem that every node shares")
            if self.tokenizer_dir is not None:
                copy_tokenizer(self.tokenizer_dir, tmp)
            rng_tensors, rng_meta = rng_to_flat()
            write_atomic(tmp / RNG_FILE, lambda name: safetensors.torch.save_file(rng_tensors, name))
            files = {p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            document = {**state, "format": "sharded", "optimizer": opt_meta, "rng": rng_meta, "files": files}
            write_text_atomic(tmp / STATE_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
        self.prune()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Load weights (and optimizer, RNG) from a verified checkpoint into live objects; returns its state.
        A sharded checkpoint loads into sharded or plain objects and is collective under torchrun."""
        state = self.read_state(path)
        if is_sharded(state):
            try:
                read_shards(path / SHARDS_DIR, model, optimizer, state["optimizer"])
                if restore_rng:
                    rng_from_flat(safetensors.torch.load_file(str(path / RNG_FILE)), state["rng"])
            except (OSError, KeyError, ValueError, RuntimeError, safetensors.SafetensorError) as err:
                raise ResumeError(f"checkpoint {path} can't be loaded: {err} (move it away and run again)") from err
            return state
        try:
            _load_weights(model, path / MODEL_FILE)
            if optimizer is not None:
                tensors = safetensors.torch.load_file(str(path / OPTIMIZER_FILE))
                optimizer.load_state_dict(optimizer_from_flat(tensors, state["optimizer"]))
            if restore_rng:
                rng_from_flat(safetensors.torch.load_file(str(path / RNG_FILE)), state["rng"])
        except (OSError, KeyError, ValueError, safetensors.SafetensorError) as err:
            raise ResumeError(f"checkpoint {path} can't be loaded: {err} (move it away and run again)") from err
        return state

    def prune(self) -> None:
        """Keep the last `keep_last` checkpoints, the best by val loss (keep_best) and pinned ones (a WSD run's
        last checkpoint before its decay, from which a longer schedule can continue)."""
        steps = self.steps()
        keep = {path for _, path in steps[-self.keep_last:]}
        if self.keep_best and (best := self.best()) is not None:
            keep.add(best)
        for _, path in steps:
            if path not in keep and not self._pinned(path):
                _remove(path)

    def _pinned(self, path: Path) -> bool:
        try:
            return bool(self.read_state(path).get("pinned"))
        except CheckpointDamaged:
            return False

    # ---- damage, leftovers, other runs ----
    def set_aside(self, path: Path, reason: str) -> Path:
        """Rename a damaged checkpoint to `<name>.damaged-<n>` (never deleted here) and say so."""
        n = 1
        while (target := path.with_name(f"{path.name}{DAMAGED}{n}")).exists():
            n += 1
        path.rename(target)
        log.warning("checkpoint %s is damaged (%s): set aside as %s — delete it once you no longer need it",
                    path, reason, target)
        return target

    def clean_leftovers(self) -> None:
        """At start: delete temp dirs of killed writers; a `step-*` without state.json older than the newest complete
        checkpoint is what an interrupted prune left (deleted), a newer one is damage (set aside)."""
        if not self.directory.is_dir():
            return
        remove_stale_temps(self.directory)
        for path in self.directory.iterdir():
            if path.name.startswith(LEGACY_TEMP_PREFIXES):
                _remove(path)
        complete = self.steps()
        newest = complete[-1][0] if complete else -1
        for path in sorted(self.directory.iterdir()):
            step = _step_of(path)
            if step is None or (path / STATE_FILE).is_file() or not path.is_dir():
                continue
            if step < newest:
                log.info("removing %s: no %s (left by an interrupted prune)", path, STATE_FILE)
                _remove(path)
            else:
                self.set_aside(path, f"{STATE_FILE} is missing")

    def archive(self, paths: list[Path], run_key: str) -> Path:
        """Move another run's checkpoints to runs/<run_key>/ (replacing the same steps there). Returns the folder;
        call `apply_retention` once done (after a run that matches again may have been restored)."""
        folder = self.directory / RUNS_DIR / run_key
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            target = folder / path.name
            if target.exists():  # the same run's same step, moved here before: the newer copy wins
                _remove(target)
            path.rename(target)
        os.utime(folder)  # most recently moved first, for the retention limit
        log.warning("moved %d checkpoint(s) of another run (%s) to %s", len(paths),
                    ", ".join(p.name for p in paths), folder)
        return folder

    def apply_retention(self) -> None:
        for folder in self.run_folders()[self.keep_other_runs:]:
            log.warning("removing %s: only the %d most recent other runs are kept (train.keep_other_runs)",
                        folder, self.keep_other_runs)
            _remove(folder)

    def restore(self, folder: Path) -> None:
        """Move an archived run's checkpoints back to the top level (it is the current run again)."""
        for _, path in self.steps(folder):
            path.rename(self.directory / path.name)
        if not any(folder.iterdir()):
            folder.rmdir()
        log.warning("moved the checkpoints of %s back to %s: this run continues them", folder, self.directory)
