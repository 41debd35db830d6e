"""`train:` params section as a typed, validated dataclass.

Which keys change the trajectory of a run (and so forbid resuming from an older checkpoint) is decided here too:
everything except the bookkeeping keys in `BOOKKEEPING_KEYS` (how often to log/evaluate/checkpoint, how many
checkpoints to keep, the resume policy, the progress bar).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gpt.config import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "wsd", "constant"]

# Keys that don't change what the model sees or how it is updated: changing them keeps a run resumable.
BOOKKEEPING_KEYS = frozenset(
    {"log_every", "eval_every", "eval_windows", "checkpoint_every", "keep_last", "keep_best", "keep_other_runs",
     "resume", "progress", "peak_flops", "compile", "parallel", "activation_checkpointing"}
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training loop knobs. Token counts are per optimizer step, summed over ranks and accumulation micro-steps."""

    # a model directory (ours, or one from `gpt import`) to continue training from: its weights, its config (the
    # model section must not contradict it) and its tokenizer (the tokenizer stage copies it); null = from scratch
    init_from: str | None = None
    max_steps: int = 570
    batch_size: int = 32  # windows per micro-batch per rank
    seq_len: int = 128
    tokens_per_step: int | None = None  # target global tokens per optimizer step; null = one micro-batch per rank
    lr: float = 6.0e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: Schedule = "wsd"
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min lr
    optimizer: Literal["adamw", "muon"] = "muon"  # muon: Muon for block matrices, AdamW for the rest (muon.py)
    muon_lr: float = 0.02  # Muon's lr at the schedule's peak (the schedule scales it like train.lr)
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Precision = "auto"
    compile: bool = False
    # under torchrun: ddp = replicate the model, average gradients; fsdp = FSDP2, each rank holds 1/N of the
    # weights, gradients and optimizer state (gpt/train/fsdp.py). One process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~+30% time
    device: str = "auto"  # auto = cuda → mps → cpu; or "cpu", "cuda", "cuda:1", "mps"
    seed: int = 1337
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10  # with on_nonfinite=skip: stop after this many skipped steps
    log_every: int = 10
    eval_every: int = 100
    eval_windows: int = 32  # fixed validation windows for the periodic val loss
    checkpoint_every: int = 200
    keep_last: int = 2
    keep_best: bool = True
    keep_other_runs: int = 3  # run folders kept under paths.checkpoints/runs/ (other runs' checkpoints)
    resume: Literal["auto", "strict", "never"] = "auto"
    peak_flops: float | None = None  # FLOP/s for MFU; null = device table (GPU) or a measured matmul (CPU)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ["max_steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "keep_last",
                    "eval_windows", "max_nonfinite_skips"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.keep_other_runs < 0:
            raise ConfigError(f"train.keep_other_runs: must be >= 0, got {self.keep_other_runs}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ConfigError(f"train.tokens_per_step: must be >= 1 or null, got {self.tokens_per_step}")
        if self.muon_lr <= 0:
            raise ConfigError(f"train.muon_lr: must be > 0, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"train.muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"train.warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        for key in ("weight_decay", "grad_clip", "eps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"train.peak_flops: must be > 0 or null, got {self.peak_flops}")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that batch_size*seq_len*world_size*accum == tokens_per_step."""
        per_micro = self.batch_size * self.seq_len * world_size
        if self.tokens_per_step is None:
            return 1
        if self.tokens_per_step % per_micro:
            raise ConfigError(
                f"train.tokens_per_step: {self.tokens_per_step} is not a multiple of batch_size*seq_len*world_size"
                f" = {self.batch_size}*{self.seq_len}*{world_size} = {per_micro}"
            )
        return self.tokens_per_step // per_micro
