"""The training loop: resume-or-start, steps, periodic validation, checkpoints, logging, clean interruption.

Everything a step depends on is a function of (params, step): the data (`get_batch(step, ...)` of the shard reader),
the learning rate (`lr_at(step)`), the dropout RNG (reseeded from (seed, rank, step)). Together with the weights and
optimizer state in a checkpoint, that makes a resumed run bit-identical to an uninterrupted one on CPU in fp32.
Which checkpoint (if any) continues a run is decided in gpt/train/resume.py.

SIGINT/SIGTERM during the loop finish the current step, save a checkpoint at it and raise `TrainingInterrupted`
(a KeyboardInterrupt: the stage prints one line and exits 128 + the signal number, 130 for Ctrl-C); a second signal
stops at once. A rerun resumes from that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from gpt.config import to_dict
from gpt.errors import GptError
from gpt.train.checkpoints import CheckpointManager, is_sharded
from gpt.train.config import TrainConfig
from gpt.train.device import Precision, resolve_precision, select_device, step_seed
from gpt.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    rank_device,
)
from gpt.train.fsdp import (
    checkpoint_blocks,
    cpu_replica,
    fqn_order,
    gather_full_weights,
    load_optimizer_state,
    shard_model,
)
from gpt.train.metrics import TrainLogger, flops_per_token, peak_flops
from gpt.train.optim import build_optimizer, lr_at, set_lr, wsd_decay_start
from gpt.train.resume import choose_resume, fingerprint, run_identity
from gpt.train.step import Batch, LabeledWindows, StepResult, labeled_validation, train_step, validation_loss

log = logging.getLogger(__name__)


class NonFiniteLossError(GptError, RuntimeError):
    """The loss or gradient norm became NaN/inf (message names which, and the step)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved at the current step."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        where = f"checkpoint {checkpoint} saved" if checkpoint else "no checkpoint saved on this rank"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; {where} — run again to "
                         "resume from it")


class BatchSource(Protocol):
    """Training data: `get_batch` returns windows [B, T+1] (or LabeledWindows); `iter_windows` yields the fixed
    validation windows (tensors [T+1], or (window, labels) pairs). TokenShards (pretraining) and
    gpt.sft.packing.PackedConversations (SFT) are the two sources."""

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> Batch: ...

    def iter_windows(self, seq_len: int, max_windows: int | None = None): ...


@dataclasses.dataclass
class TrainResult:
    step: int
    val_loss: float
    best_val_loss: float
    tokens_seen: int
    train_seconds: float  # wall time of this invocation's steps; a rerun with nothing left to train: the run's recorded total
    tokens_per_second: float
    mfu: float
    resumed_from: int  # 0 = fresh start
    nonfinite_skipped: int
    best_checkpoint: str | None
    last_checkpoint: str | None


@dataclasses.dataclass
class Run:
    """The live objects of one training run on one rank."""

    cfg: TrainConfig
    model: nn.Module  # the bare model (weights saved from here)
    trained: nn.Module  # what forward/backward run on: maybe compiled, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    precision: Precision
    scaler: torch.amp.GradScaler | None
    device: torch.device
    info: DistInfo
    accum: int
    sharded: bool = False  # FSDP: `model` holds this rank's shards; rank 0 keeps a full CPU replica
    full_model: nn.Module | None = None  # rank 0 under FSDP: the whole weights, gathered for the export
    fqns: list[str] = dataclasses.field(default_factory=list)  # FSDP: parameter name of each optimizer index


def setup_run(model: nn.Module, cfg: TrainConfig) -> Run:
    """Device, process group, precision, optimizer; the model is moved (not yet wrapped)."""
    device = select_device(cfg.device)
    info = init_distributed(device)
    device = rank_device(device, info)
    precision = Precision(resolve_precision(cfg.precision, device), device.type)
    model.to(device)
    optimizer = build_optimizer(model, cfg, device.type, precision.name)
    return Run(cfg=cfg, model=model, trained=model, optimizer=optimizer, precision=precision,
               scaler=precision.grad_scaler(), device=device, info=info, accum=cfg.grad_accum_steps(info.world_size))


def wrap_for_training(run: Run) -> None:
    """FSDP2 sharding or (after an optional torch.compile) DDP when world_size > 1, and activation checkpointing —
    applied from outside, the model stays plain."""
    if run.info.enabled and run.cfg.parallel == "fsdp":
        _shard(run)
    if run.cfg.activation_checkpointing:
        checkpoint_blocks(run.model)
    trained = run.model
    if run.cfg.compile:
        trained = torch.compile(trained)
    if run.info.enabled and not run.sharded:
        ids = [run.device.index] if run.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=ids)
    run.trained = trained


def _shard(run: Run) -> None:
    """FSDP2: keep rank 0's full CPU replica, shard the model, rebuild the optimizer over the sharded parameters and
    hand it the (possibly resumed) full optimizer state."""
    full_state = run.optimizer.state_dict()
    run.fqns = fqn_order(run.model, run.optimizer)
    run.full_model = cpu_replica(run.model) if run.info.is_main else None
    shard_model(run.model, run.device, run.precision)
    run.optimizer = build_optimizer(run.model, run.cfg, run.device.type, run.precision.name)
    load_optimizer_state(run.model, run.optimizer, full_state, run.fqns)
    run.sharded = True


def micro_batches(data: BatchSource, step: int, run: Run) -> list[Batch]:
    """This rank's rows of the global batch of `step`, split into `accum` micro-batches."""
    cfg = run.cfg
    rows = data.get_batch(step, cfg.batch_size * run.accum, cfg.seq_len, cfg.seed, rank=run.info.rank,
                          world_size=run.info.world_size)
    return list(rows.to(run.device, non_blocking=True).chunk(run.accum))


def fixed_val_windows(data: BatchSource, cfg: TrainConfig, device: torch.device) -> Batch:
    """The first eval_windows validation windows: a tensor [N, T+1], or LabeledWindows when the source yields
    (window, labels) pairs (SFT)."""
    windows = list(data.iter_windows(cfg.seq_len, max_windows=cfg.eval_windows))
    if not windows:
        raise ValueError(f"validation split has fewer than {cfg.seq_len + 1} tokens: can't evaluate "
                         f"(lower train.seq_len or add text)")
    if isinstance(windows[0], tuple):
        return LabeledWindows(torch.stack([w for w, _ in windows]), torch.stack([lab for _, lab in windows])).to(device)
    return torch.stack(windows).to(device)


def _validate(run: Run, val_windows: Batch) -> dict[str, float]:
    """The periodic validation metrics: val/loss (and val/accuracy on labeled windows: assistant tokens in SFT)."""
    # FSDP: every forward is a collective, so every rank runs all windows (ranks splitting the rows could run
    # different numbers of batches and hang); each then has the whole result, nothing to reduce
    info = DistInfo() if run.sharded else run.info
    if isinstance(val_windows, LabeledWindows):
        scores = labeled_validation(run.trained, val_windows, run.precision, run.cfg.batch_size, info)
        return {"val/loss": scores["loss"], "val/accuracy": scores["accuracy"]}
    return {"val/loss": validation_loss(run.trained, val_windows, run.precision, run.cfg.batch_size, info)}


def _save_checkpoint(run: Run, manager: CheckpointManager, step: int, tokens: int, val_loss: float, best: float,
                     skipped: int, identity: dict[str, Any], model_config: dict[str, Any],
                     timing: dict[str, float]) -> Path | None:
    """Every rank calls it: under FSDP each writes its shard (a sharded checkpoint); otherwise rank 0 writes the
    whole checkpoint. Rank 0 gets the path, the other ranks None. `timing` (steps trained and their wall seconds,
    summed over every invocation of this run) lets a rerun that has nothing left to train report the throughput
    the run measured instead of 0 — DVC deletes a stage's metrics files before running it."""
    state = {
        "timing": timing,
        "step": step,
        "tokens_seen": tokens,
        "val_loss": val_loss,
        "best_val_loss": best,
        "nonfinite_skipped": skipped,
        "data": {"next_step": step, "seed": run.cfg.seed, "rows_per_rank": run.cfg.batch_size * run.accum,
                 "seq_len": run.cfg.seq_len, "world_size": run.info.world_size},
        "schedule": {"kind": run.cfg.schedule, "step": step, "lr_next": lr_at(min(step, run.cfg.max_steps - 1), run.cfg)},
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "precision": run.precision.name,
        "params": {"train": to_dict(run.cfg), "model": model_config},
        "identity": identity,
        "fingerprint": fingerprint(identity),
        "lineage": identity["lineage"],
        "pinned": _is_branch_point(step, run.cfg),
    }
    if run.sharded:
        return manager.save_sharded(run.model, run.optimizer, state, run.info)
    return manager.save(run.model, run.optimizer, state) if run.info.is_main else None


def _is_branch_point(step: int, cfg: TrainConfig) -> bool:
    """WSD: the last regular checkpoint before the decay starts — a longer schedule continues from it (resume.py),
    so pruning keeps it."""
    decay_start = wsd_decay_start(cfg)
    next_regular = (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    return decay_start is not None and step <= decay_start < next_regular


def _resume_path(run: Run, manager: CheckpointManager, identity: dict[str, Any]) -> tuple[Path | None, bool]:
    """Rank 0 picks the checkpoint (or none) and every rank learns it: (path, whether it is sharded)."""
    path = choose_resume(manager, identity, run.cfg) if run.info.is_main else None
    sharded = path is not None and is_sharded(manager.read_state(path))
    path, sharded = broadcast_object((str(path) if path else None, sharded), run.info)
    return (Path(path) if path else None), sharded


def _restore(run: Run, manager: CheckpointManager, path: Path) -> dict[str, Any]:
    state = manager.load(path, run.model, run.optimizer)
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    log.info("resuming from %s (step %d)", path, state["step"])
    return state


def _handle_nonfinite(run: Run, step: int, result: StepResult, skipped: int, manager: CheckpointManager) -> int:
    if math.isfinite(result.loss):  # the loss was fine: the gradients overflowed
        value = f"gradient norm ({result.grad_norm}; the loss {result.loss:.4f} was finite)"
    else:
        value = f"loss ({result.loss})"
    where = f"non-finite {value} at step {step + 1} (lr {lr_at(step, run.cfg):.3g})"
    latest = manager.latest()
    if run.cfg.on_nonfinite == "stop":
        raise NonFiniteLossError(f"train: {where}; stopped. Last checkpoint: {latest}. Lower train.lr, raise "
                                 "warmup_steps, or set train.on_nonfinite: skip")
    skipped += 1
    log.warning("train: %s; update skipped (%d so far)", where, skipped)
    if skipped > run.cfg.max_nonfinite_skips:
        raise NonFiniteLossError(f"train: {where}; {skipped} steps skipped > train.max_nonfinite_skips "
                                 f"({run.cfg.max_nonfinite_skips}); stopped. Last checkpoint: {latest}")
    return skipped


@dataclasses.dataclass
class Throughput:
    """Tokens/s and MFU over the steps since the last measurement."""

    tokens_per_step: int
    flops_per_token: float
    peak: float
    steps: int = 0
    since: float = dataclasses.field(default_factory=time.perf_counter)

    def measure(self) -> tuple[float, float]:
        now = time.perf_counter()
        tok_s = self.tokens_per_step * self.steps / max(now - self.since, 1e-9)
        self.steps, self.since = 0, now
        return tok_s, (tok_s * self.flops_per_token / self.peak if self.peak else 0.0)


def train(model: nn.Module, cfg: TrainConfig, train_data: BatchSource, val_data: BatchSource,
          checkpoint_dir: Path, model_config: dict[str, Any], lineage: dict[str, Any],
          live_dir: Path | None = None, tokenizer_dir: Path | None = None) -> tuple[TrainResult, Run]:
    """Train `model` (already initialised with the same seed on every rank) for cfg.max_steps optimizer steps,
    resuming from `checkpoint_dir` when a compatible checkpoint exists. Rank 0 writes checkpoints and metrics."""
    run = setup_run(model, cfg)
    manager = CheckpointManager(checkpoint_dir, keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                                keep_other_runs=cfg.keep_other_runs, tokenizer_dir=tokenizer_dir)
    identity = run_identity(cfg, model_config, lineage, run.info.world_size)
    path, sharded_checkpoint = _resume_path(run, manager, identity)
    # a whole checkpoint loads into the plain model (FSDP then shards it); a sharded one loads into whatever layout
    # this run has (FSDP shards over any number of ranks, or plain tensors)
    state = _restore(run, manager, path) if path and not sharded_checkpoint else {}
    wrap_for_training(run)
    if path and sharded_checkpoint:
        state = _restore(run, manager, path)
    start = state.get("step", 0)
    tokens, skipped = state.get("tokens_seen", 0), state.get("nonfinite_skipped", 0)
    val_loss, best = state.get("val_loss", math.nan), state.get("best_val_loss", math.inf)
    val_windows = fixed_val_windows(val_data, cfg, run.device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * run.accum * run.info.world_size
    flops_tok = flops_per_token(run.model, model_config.get("n_layers", 0), model_config.get("d_model", 0),
                                cfg.seq_len)
    peak = peak_flops(run.device, run.precision.name, cfg.peak_flops) if run.info.is_main else 0.0
    logger = TrainLogger(live_dir if run.info.is_main else None, resume_step=start)
    # disable=None: no bar when stderr is not a terminal (CI logs, `make repro > log`); DVCLive still logs
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step",
               disable=None if cfg.progress and run.info.is_main else True)
    run.trained.train()
    t0, last_ckpt, tok_s = time.perf_counter(), None, 0.0
    timed = state.get("timing") or {"steps": 0, "seconds": 0.0}  # earlier invocations of this run
    clock = Throughput(tokens_per_step, flops_tok, peak)
    with stop_signals() as stop, contextlib.closing(bar):
        for step in range(start, cfg.max_steps):
            torch.manual_seed(step_seed(cfg.seed, run.info.rank, step))
            lr = lr_at(step, cfg)
            set_lr(run.optimizer, lr)
            result = train_step(run.trained, run.optimizer, micro_batches(train_data, step, run), run.precision,
                                cfg.grad_clip, run.info, run.scaler)
            if not result.finite:
                skipped = _handle_nonfinite(run, step, result, skipped, manager)
            tokens, clock.steps, done = tokens + tokens_per_step, clock.steps + 1, step + 1
            is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
            metrics = {}
            if done % cfg.log_every == 0 or is_ckpt or done == 1:  # same rows whether or not the run was resumed
                tok_s, mfu = clock.measure()
                metrics = {"train/loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                           "tokens_per_s": tok_s, "mfu": mfu, "tokens": tokens}
                metrics.update(_router_stats(run.model))
            if done % cfg.eval_every == 0 or is_ckpt:
                scores = _validate(run, val_windows)
                val_loss = scores["val/loss"]
                best = min(best, val_loss)
                metrics.update(scores)
            logger.log(done, metrics)
            bar.set_postfix(loss=f"{result.loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            stopping = done < cfg.max_steps and _agreed(stop.signum is not None, run)  # the last step: finish
            if is_ckpt or stopping:
                timing = {"steps": timed["steps"] + done - start,
                          "seconds": timed["seconds"] + time.perf_counter() - t0}
                last_ckpt = _save_checkpoint(run, manager, done, tokens, val_loss, best, skipped, identity,
                                             model_config, timing)
                barrier(run.info)
            if stopping:
                raise TrainingInterrupted(stop.signum or signal.SIGINT, done, last_ckpt)
    elapsed = time.perf_counter() - t0
    if cfg.max_steps > start:
        avg_tok_s = tokens_per_step * (cfg.max_steps - start) / elapsed
    else:  # nothing left to train (a finished run re-exported): report what the run measured when it trained
        elapsed = timed["seconds"]
        avg_tok_s = tokens_per_step * timed["steps"] / elapsed if elapsed > 0 else 0.0
    result = TrainResult(step=cfg.max_steps, val_loss=val_loss, best_val_loss=best, tokens_seen=tokens,
                         train_seconds=elapsed, tokens_per_second=avg_tok_s,
                         mfu=avg_tok_s * flops_tok / peak if peak else 0.0, resumed_from=start,
                         nonfinite_skipped=skipped, best_checkpoint=_str(manager.best(), run.info),
                         last_checkpoint=_str(last_ckpt or manager.latest(), run.info))
    logger.summary({"final/val_loss": val_loss})
    if avg_tok_s > 0:  # a re-export (nothing trained now) keeps a logged throughput, else reports the recorded one
        logger.summary({"final/tokens_per_s": avg_tok_s, "final/mfu": result.mfu}, keep_existing=cfg.max_steps == start)
    logger.close()
    if run.sharded:  # the export is written whole, from rank 0's replica (a collective all-gather)
        gather_full_weights(run.model, run.full_model)
        if run.info.is_main:
            run.model = run.full_model
    return result, run


@dataclasses.dataclass
class StopRequest:
    signum: int | None = None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """While training: the first SIGINT/SIGTERM only records itself (the loop saves and stops after the current
    step); the same signal again (Ctrl-C twice) raises KeyboardInterrupt at once. The other signal is ignored once
    stopping: torchrun answers a Ctrl-C by sending its workers SIGTERM, which must not cut the save short.
    Handlers are restored on exit."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield stop
        return

    def handler(signum, frame):
        if stop.signum == signum:
            raise KeyboardInterrupt
        stop.signum = stop.signum or signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _agreed(flag: bool, run: Run) -> bool:
    """Under DDP every rank stops at the same step (a signal may reach the ranks at different steps)."""
    if not run.info.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=run.device), run.info).item() > 0)


def _router_stats(model: nn.Module) -> dict[str, float]:
    """MoE expert load per layer from the last forward (empty for dense models), logged under moe/."""
    stats = getattr(model, "router_stats", None)
    return {f"moe/{k}": v for k, v in stats().items()} if callable(stats) else {}


def _str(path: Path | None, info: DistInfo) -> str | None:
    return str(path) if path is not None and info.is_main else None
