"""Which checkpoint continues this run: run identity, fingerprint, and the resume decision.

A run is identified by everything that changes its trajectory (model config, the train params except bookkeeping
keys, world size, tokenizer and shard hashes, the training/model source code). A checkpoint continues this run when
its identity is equal **except `train.max_steps`**, and the learning rate of every step it has already taken is the
same under the new `max_steps` (`lr_at` compared step by step). What that means per schedule:

- constant: the lr never depends on max_steps → raising max_steps on a finished run continues from its last
  checkpoint, and ends bit-identical to a run started with the larger max_steps.
- wsd: the lr is flat until the decay starts at `max_steps - decay_fraction * max_steps` → a longer run continues
  from the last checkpoint before the old decay (the loop pins that checkpoint, so pruning keeps it), not from the
  decayed end (whose lr already fell).
- cosine: the curve is stretched by max_steps from the end of warmup on → a changed max_steps only continues from a
  checkpoint still inside warmup; otherwise the run starts fresh (continuing would not be the run the params
  describe). Use wsd or constant to extend runs.

A checkpoint that doesn't continue this run is another run's: `resume: auto` moves it under `runs/<fingerprint>/`
(CheckpointManager.archive, never deleted beyond `keep_other_runs`) and starts fresh — or continues an archived run
that does match (params changed back); `resume: strict` fails naming the changed keys; `resume: never` archives
and starts fresh. Damaged checkpoints are set aside and the newest intact one is used (none intact: auto starts fresh
with a warning, strict fails).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gpt.config import to_dict
from gpt.train.checkpoints import CheckpointDamaged, CheckpointManager, ResumeError
from gpt.train.config import BOOKKEEPING_KEYS, TrainConfig
from gpt.train.optim import lr_at

log = logging.getLogger(__name__)


def source_hash() -> str:
    """sha256 of the training and model source: code changes make old checkpoints non-resumable."""
    digest = hashlib.sha256()
    roots = [Path(__file__).parent, Path(__file__).parent.parent / "model"]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_identity(cfg: TrainConfig, model_config: dict[str, Any], lineage: dict[str, Any],
                 world_size: int) -> dict[str, Any]:
    """The params and inputs that define a run's trajectory (everything a resumed run must share)."""
    train = {k: v for k, v in to_dict(cfg).items() if k not in BOOKKEEPING_KEYS}
    # with train.tokens_per_step the global batch doesn't depend on the world size (accumulation makes up the
    # difference), so a checkpoint continues on any number of ranks; without it batch_size is per rank
    ranks = None if cfg.tokens_per_step is not None else world_size
    return {"model": model_config, "train": train, "world_size": ranks, "lineage": lineage,
            "source": source_hash()}


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _without_max_steps(identity: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in identity.get("train", {}).items() if k != "max_steps"}
    return {**identity, "train": train}


def first_lr_difference(old_max_steps: int, cfg: TrainConfig, steps: int) -> int | None:
    """The first of steps 0..steps-1 whose lr differs between max_steps=old_max_steps and cfg, or None."""
    if old_max_steps == cfg.max_steps:
        return None
    old = dataclasses.replace(cfg, max_steps=old_max_steps)
    return next((t for t in range(steps) if lr_at(t, old) != lr_at(t, cfg)), None)


def mismatch(state: dict[str, Any], identity: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Why the checkpoint with `state` can't continue this run (empty: it can)."""
    old = state.get("identity", {})
    changed = _changed_keys(_without_max_steps(old), _without_max_steps(identity))
    if changed:
        return changed
    step, old_max = state.get("step", 0), old.get("train", {}).get("max_steps", cfg.max_steps)
    if step > cfg.max_steps:
        return [f"train.max_steps ({cfg.max_steps} < the checkpoint's step {step})"]
    differs = first_lr_difference(old_max, cfg, step)
    if differs is not None:
        return [f"train.max_steps ({old_max} → {cfg.max_steps} changes the {cfg.schedule} learning rate from step "
                f"{differs}, before this checkpoint's step {step})"]
    return []


def _run_key(state: dict[str, Any]) -> str:
    return str(state.get("fingerprint") or "unknown")[:16]


def _newest_usable(manager: CheckpointManager, directory: Path, identity: dict[str, Any], cfg: TrainConfig):
    """Scan `directory` newest first → (usable path or None, damaged [(path, reason)] newer than it,
    other runs' checkpoints [(path, state, reasons)])."""
    damaged, others = [], []
    for _, path in reversed(manager.steps(directory)):
        try:
            state = manager.read_state(path)
        except CheckpointDamaged as err:
            damaged.append((path, err.reason))
            continue
        reasons = mismatch(state, identity, cfg)
        if reasons:
            others.append((path, state, reasons))
            continue
        try:
            manager.verify(path, state)
        except CheckpointDamaged as err:
            damaged.append((path, err.reason))
            continue
        return path, damaged, others
    return None, damaged, others


def _archive_others(manager: CheckpointManager, others: list) -> None:
    by_run: dict[str, list[Path]] = {}
    for path, state, _ in others:
        by_run.setdefault(_run_key(state), []).append(path)
    for key, paths in by_run.items():
        manager.archive(sorted(paths), key)


def _from_archive(manager: CheckpointManager, identity: dict[str, Any], cfg: TrainConfig) -> Path | None:
    """The furthest intact checkpoint of an archived run that this run continues; its folder is moved back."""
    best: tuple[int, Path, Path] | None = None
    for folder in manager.run_folders():
        path, _, _ = _newest_usable(manager, folder, identity, cfg)
        if path is not None and (best is None or manager.read_state(path)["step"] > best[0]):
            best = (manager.read_state(path)["step"], folder, path)
    if best is None:
        return None
    _, folder, path = best
    manager.restore(folder)
    return manager.directory / path.name


def choose_resume(manager: CheckpointManager, identity: dict[str, Any], cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start (see the module docstring)."""
    manager.clean_leftovers()
    policy = cfg.resume
    path, damaged, others = _newest_usable(manager, manager.directory, identity, cfg)
    newest_other = others[0] if others else None
    if policy == "strict" and newest_other and path is None:  # strict: fail rather than start over
        other_path, _, reasons = newest_other
        raise ResumeError(f"checkpoint {other_path} belongs to a different run; changed: {', '.join(reasons)} "
                          "(train.resume is strict: restore those params, or set resume: auto to start fresh — "
                          "the old checkpoints are then kept under runs/)")
    if path is None and damaged and policy == "strict":
        raise ResumeError("no intact checkpoint to resume: " + "; ".join(f"{p}: {r}" for p, r in damaged)
                          + " (train.resume is strict; set resume: auto to set them aside and start fresh)")
    for bad, reason in damaged:
        manager.set_aside(bad, reason)
    if others:
        other_path, _, reasons = newest_other
        log.warning("checkpoint %s belongs to a different run; changed: %s", other_path, ", ".join(reasons))
        _archive_others(manager, others)
    if policy == "never":
        if path is not None:
            _archive_others(manager, [(p, manager.read_state(p), []) for _, p in manager.steps()])
        path = None
    elif path is None:
        path = _from_archive(manager, identity, cfg)
    manager.apply_retention()  # after a matching archived run was moved back, so it can't be the one removed
    if path is None and (damaged or others):
        log.warning("no intact checkpoint of this run: starting fresh")
    elif damaged:
        log.warning("falling back to %s", path)
    return path
