"""params.yaml `rl:` — `RLConfig`, the knobs of the `rl` stage (GRPO or PPO on the checkable SFT tasks)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gpt.config import ConfigError
from gpt.sft.tasks import TASK_NAMES

Algorithm = Literal["grpo", "ppo"]


@dataclasses.dataclass
class RLConfig:
    algorithm: Algorithm = "grpo"
    steps: int = 200  # rl_step calls (one batch of rollouts each)
    prompts_per_step: int = 4
    group_size: int = 8  # completions sampled per prompt (GRPO's group; PPO uses it as plain batch size)
    max_new_tokens: int = 8
    temperature: float = 1.0  # sampling temperature; the training forward scores with the same one
    lr: float = 3.0e-4
    updates_per_batch: int = 1  # optimizer steps on one batch of rollouts (>1 makes the ratio clipping matter)
    clip_eps: float = 0.2  # PPO ratio clipping: ratio kept in [1 - eps, 1 + eps]
    normalize_std: bool = True  # GRPO: divide advantages by the group std (Dr. GRPO drops this)
    kl_coef: float = 0.0  # weight of the k3 KL estimate to the frozen reference model (0 = no reference)
    # reward for a well-formed reply (optional <think>…</think>, then a non-empty answer closed by <|end|>),
    # added to the correctness reward (1 for a right answer)
    format_weight: float = 0.1
    max_grad_norm: float = 1.0
    # prompts: problems of these gpt.sft.tasks generators, training side only (sft_data.tasks' held-out split)
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["count_words"])
    heldout_items: int = 200  # held-out problems per task, answered greedily before, every eval_every steps, after
    eval_every: int = 0  # 0 = only before and after
    samples: int = 4  # completions written to metrics/rl_samples.md
    seed: int = 0
    # PPO only
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.5
    value_clip_eps: float = 0.2

    def __post_init__(self) -> None:
        if self.algorithm not in ("grpo", "ppo"):
            raise ConfigError(f"rl.algorithm: expected 'grpo' or 'ppo', got {self.algorithm!r}")
        for key in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rl.{key}: must be >= 1, got {getattr(self, key)}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ConfigError("rl.group_size: GRPO needs at least 2 completions per prompt to compare")
        if self.temperature <= 0:
            raise ConfigError(f"rl.temperature: must be > 0 (log-probs of greedy decoding are undefined), "
                              f"got {self.temperature}")
        for key in ("clip_eps", "value_clip_eps", "lr", "max_grad_norm"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"rl.{key}: must be > 0, got {getattr(self, key)}")
        for key in ("kl_coef", "format_weight", "value_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rl.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("heldout_items", "eval_every", "samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rl.{key}: must be >= 0, got {getattr(self, key)}")
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown or not self.tasks:
            raise ConfigError(f"rl.tasks: unknown or empty {unknown or self.tasks}; choose from {list(TASK_NAMES)}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"rl.{key}: must be in [0, 1], got {getattr(self, key)}")
